"""Precomputed features: run a frozen encoder over every patch of a grid, write `features/<name>`.

Streaming and resumable. Patches come through the prefetching loader in chunks of `chunk_size`; each
chunk's embeddings `(chunk_size, F)` are written as one whole zarr chunk of `features/<name>/embeddings`
`(N, F)` (no read-modify-write, never `(N, F)` in memory), then the array's `ips_progress` attribute
records how many rows are done. A rerun continues from there; the feature set is announced in the
store's `ips.features` attribute (what `FeatureSource` reads) only once every row is written.

Each feature set carries its provenance (attribute `provenance` of `features/<name>`, and in the
announcement): the encoder's name, the sha256 of its weights file (null: random weights), the grid's
micrometers per pixel, the normalisation, the stored dtype, and for a foundation encoder its catalog entry
(input size, pooling, licence). A rerun with other weights or another normalisation starts over.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn

from ips.data.store import FeatureInfo, StoreLocation, open_store
from ips.data.streaming import stream_chunks
from ips.data.zarr_source import ZarrPatchSource
from ips.format import names as sf
from ips.format.store import IpsStore
from ips.model.foundation import FoundationEncoder
from ips.model.ips_model import normalize_pixels, pixel_stats
from ips.runtime import Runtime, autocast_dtype_for

PROGRESS_ATTR = "ips_progress"


def embed_store(
    store: StoreLocation,
    encoder: nn.Module,
    *,
    grid: str = sf.DEFAULT_GRID,
    name: str = sf.DEFAULT_GRID,
    chunk_size: int = 256,
    device: str | torch.device = "cpu",
    encoder_name: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dtype: str = "float16",
    prefetch: int = 2,
    read_threads: int = 4,
    overwrite: bool = False,
) -> FeatureInfo:
    """Embed every patch of `grid` with `encoder` (frozen, eval mode) into `features/<name>`.

    Patches `(n, C, *S)` uint8 go to `device`, become float in [0, 1], are normalised with `mean`/`std`
    (default `pixel_stats`) and encoded to `(n, F)`; bf16 autocast on CUDA. Resumes an interrupted run
    with the same encoder and grid; `overwrite` starts over. Returns the finished feature set's info.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    if not name or "/" in name:
        raise ValueError(f"feature set name must be a plain name, got {name!r}")
    device = torch.device(device)
    encoder_name = encoder_name or type(encoder).__name__
    opened = open_store(store, mode="r+")
    if name in opened.features and not overwrite:
        return opened.features[name]  # already complete
    source = ZarrPatchSource(store, grid, read_threads)
    n = len(source)
    in_chans = source.patch_shape[0]
    if mean is None or std is None:
        mean, std = pixel_stats(encoder, in_chans)
    provenance = feature_provenance(
        encoder, encoder_name=encoder_name, mpp=grid_mpp(opened, grid), mean=mean, std=std, dtype=dtype
    )
    embed = _embedder(
        encoder,
        encoder_name=encoder_name,
        mean=mean,
        std=std,
        in_chans=in_chans,
        spatial_dims=source.spatial_dims,
        device=device,
    )

    was_training = encoder.training
    encoder.eval()
    try:
        with torch.inference_mode():
            # the feature dimension, from one forward of a blank patch
            dim = int(embed(torch.zeros((1, *source.patch_shape), dtype=torch.uint8)).shape[1])
            group = opened.group
            emb_array, done = _resume_or_create(
                group,
                f"{sf.FEATURES_GROUP}/{name}",
                coords=source.coords,
                dim=dim,
                run={
                    "grid": grid,
                    "encoder": encoder_name,
                    "total": n,
                    "dim": dim,
                    "weights_sha256": provenance["weights_sha256"],
                    "mean": provenance["mean"],
                    "std": provenance["std"],
                },
                chunk_size=chunk_size,
                dtype=dtype,
                overwrite=overwrite,
            )
            rows = emb_array.chunks[0]  # write whole zarr chunks, so a resumed run starts at a chunk boundary
            if done < n:
                order = np.arange(done, n, dtype=np.int64)
                for chunk in stream_chunks(
                    source, rows, prefetch=prefetch, order=order, pin_memory=device.type == "cuda"
                ):
                    vectors = embed(chunk.patches)  # (rows, F)
                    start = int(chunk.indices[0])
                    emb_array[start : start + len(vectors)] = vectors.numpy().astype(emb_array.dtype)
                    emb_array.attrs[PROGRESS_ATTR] = {
                        **emb_array.attrs[PROGRESS_ATTR],
                        "done": start + len(vectors),
                    }
    finally:
        encoder.train(was_training)
    group[f"{sf.FEATURES_GROUP}/{name}"].attrs["provenance"] = provenance
    entry = {"grid": grid, "encoder": encoder_name, "dim": dim, "provenance": provenance}
    _announce(group, name, entry)  # last: readers see only complete feature sets
    return FeatureInfo(name, grid, encoder_name, dim)


def _announce(group: zarr.Group, name: str, entry: dict[str, Any]) -> None:
    """List the feature set in the store's `ips` attributes."""
    ips_attrs = dict(group.attrs[sf.IPS_ATTR])
    ips_attrs["features"] = {**(ips_attrs.get("features") or {}), name: entry}
    group.attrs[sf.IPS_ATTR] = ips_attrs


def grid_mpp(opened: IpsStore, grid: str) -> float | None:
    """Micrometers per pixel of `grid`'s level (mean of y and x), None where the store has no spacing."""
    if not opened.spacing:
        return None
    level = opened.grid(grid).level
    factors = opened.level_downsamples[level] if level < len(opened.level_downsamples) else (1.0,)
    yx = [float(s) * float(f) for s, f in zip(opened.spacing[-2:], tuple(factors)[-2:])]
    return round(sum(yx) / len(yx), 6)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's sha256, once per (path, size, mtime) in a process: one embed run over a cohort hashes
    a multi-GB weights file once, not once per store."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(path: str | Path | None) -> str | None:
    if path is None:
        return None
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def feature_provenance(
    encoder: nn.Module,
    *,
    encoder_name: str,
    mpp: float | None,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: str,
) -> dict[str, Any]:
    """What made a feature set: encoder name, weights hash (from `encoder.weights_path`, set by the
    builders that load a file; null = random weights), grid mpp, normalisation, dtype, and a foundation
    encoder's catalog entry."""
    record: dict[str, Any] = {
        "encoder": encoder_name,
        "weights_sha256": weights_sha256(getattr(encoder, "weights_path", None)),
        "mpp": mpp,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "dtype": dtype,
    }
    if isinstance(encoder, FoundationEncoder):
        spec = encoder.spec
        record["foundation"] = {
            "name": spec.name,
            "mpp": spec.mpp,
            "input_size": spec.input_size,
            "pool": spec.pool,
            "licence": spec.licence,
            "hub": spec.hub,
        }
    return record


def _embedder(
    encoder: nn.Module,
    *,
    encoder_name: str,
    mean: Sequence[float],
    std: Sequence[float],
    in_chans: int,
    spatial_dims: int,
    device: torch.device,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`(n, C, *S)` uint8 patches on the host -> `(n, F)` float32 on the host: normalised, encoded on
    `device` (bf16 autocast on CUDA)."""
    shape = (1, in_chans) + (1,) * spatial_dims
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).reshape(shape)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).reshape(shape)

    def embed(patches: torch.Tensor) -> torch.Tensor:
        """`(n, C, *S)` uint8 on the host -> `(n, F)` float32 on the host."""
        x = patches.to(device, non_blocking=True)
        x = normalize_pixels(x, mean_t, std_t)
        with Runtime(device, autocast_dtype_for(device)).autocast():
            out = encoder(x)
        if out.ndim != 2:
            raise ValueError(f"encoder {encoder_name!r} returned shape {tuple(out.shape)}, expected (n, F)")
        return out.float().cpu()

    return embed


def _resume_or_create(
    group: zarr.Group,
    path: str,
    *,
    coords: np.ndarray,
    dim: int,
    run: dict[str, Any],
    chunk_size: int,
    dtype: str,
    overwrite: bool,
) -> tuple[zarr.Array, int]:
    """The embeddings array `(N, dim)` to write and the rows already done: those of an interrupted run
    of the same `run` (grid, encoder, N, dim) and dtype, else 0 in a fresh array."""
    key = f"{path}/{sf.EMBEDDINGS_ARRAY}"
    if not overwrite and key in group:
        arr = group[key]
        progress = dict(arr.attrs.get(PROGRESS_ATTR) or {})
        if all(progress.get(k) == v for k, v in run.items()) and str(arr.dtype) == dtype:
            return arr, int(progress.get("done", 0))
    if path in group:
        name = path.rsplit("/", 1)[-1]
        ips_attrs = dict(group.attrs[sf.IPS_ATTR])
        if name in (ips_attrs.get("features") or {}):  # un-announce before rewriting
            ips_attrs["features"] = {k: v for k, v in ips_attrs["features"].items() if k != name}
            group.attrs[sf.IPS_ATTR] = ips_attrs
        del group[path]
    feats = group.require_group(path)
    n = len(coords)
    feats.create_array(sf.COORDS_ARRAY, data=coords, chunks=(max(1, min(n, 1 << 18)), coords.shape[1]))
    arr = feats.create_array(
        sf.EMBEDDINGS_ARRAY, shape=(n, dim), chunks=(chunk_size, dim), dtype=dtype, fill_value=0
    )
    arr.attrs[PROGRESS_ATTR] = {**run, "done": 0}
    return arr, 0
