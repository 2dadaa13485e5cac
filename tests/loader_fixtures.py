"""Tiny ips stores for the loader tests, written by hand per docs/FORMAT.md.

`write_store` is the reader tests' independent writer: it follows the format page literally (chunk =
one patch at the grid's level, shards of 8 x 8 chunks, background chunks unwritten, completion marker
last) and can write what the real writer never does: grids whose patches stick out of the image (the
reader pads them with the background), hand-picked coords, stores with no pixel chunks at all (cheap
100k-patch stores for the memory test). Stores made by the real writer (`data_prep.convert`) are read
back in tests/test_loader_prep.py and in the contract suite.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import zarr

from ips.format import names as sf

SHARD_CHUNKS = 8


def grid_coords(shape: tuple[int, ...], patch: tuple[int, ...], stride: tuple[int, ...]) -> np.ndarray:
    """All top-left corners of a regular grid that start inside `shape` (edge patches stick out).

    Returns int64 `(N, dims)`, row-major.
    """
    axes = [np.arange(0, s, st) for s, st in zip(shape, stride)]
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1).astype(np.int64)


def _level(array: np.ndarray, level: int) -> np.ndarray:
    """Level `level` of a pyramid: plain 2**level subsampling of every spatial axis."""
    step = 2**level
    return array[(slice(None),) + (slice(None, None, step),) * (array.ndim - 1)]


def write_store(
    path: str | Path,
    array: np.ndarray,
    *,
    patch_size: int | tuple[int, ...],
    stride: int | tuple[int, ...] | None = None,
    level: int = 0,
    n_levels: int | None = None,
    coords: np.ndarray | None = None,
    background: int = 255,
    grid_name: str = sf.DEFAULT_GRID,
    complete: bool = True,
    features: dict[str, np.ndarray] | None = None,
    write_chunks: bool = True,
) -> Path:
    """Write `array` `(C, Y, X)` or `(C, Z, Y, X)` uint8 as an ips store at `path`.

    `coords` default: the full regular grid at `level`. `features`: name -> `(N, F)` embeddings.
    `write_chunks=False` leaves every pixel chunk unwritten (reads return `background`; cheap stores
    with many patches).
    """
    path = Path(path)
    dims = array.ndim - 1
    patch = (patch_size,) * dims if isinstance(patch_size, int) else tuple(patch_size)
    stride = patch if stride is None else ((stride,) * dims if isinstance(stride, int) else tuple(stride))
    n_levels = max(level + 1, 1) if n_levels is None else n_levels
    root = zarr.open_group(path, mode="w")
    datasets = []
    for k in range(n_levels):
        data = _level(array, k)
        # the grid's level is chunked one patch per chunk; others in modest square chunks
        chunk = (data.shape[0],) + (patch if k == level else tuple(min(64, s) for s in data.shape[1:]))
        shard = (data.shape[0],) + tuple(c * SHARD_CHUNKS for c in chunk[1:])
        arr = root.create_array(
            str(k),
            shape=data.shape,
            chunks=chunk,
            shards=shard,
            dtype="uint8",
            fill_value=background,
            config={"write_empty_chunks": False},
        )
        if write_chunks:
            arr[...] = data
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [{"type": "scale", "scale": [1.0] + [float(2**k)] * dims}],
            }
        )
    level_shape = _level(array, level).shape[1:]
    if coords is None:
        coords = grid_coords(level_shape, patch, stride)
    coords = np.asarray(coords, dtype=np.int64)
    entry = {
        "level": level,
        "patch_size": list(patch),
        "stride": list(stride),
        "min_tissue": 0.0,
        "n_patches": int(len(coords)),
    }
    grid = root.create_group(f"{sf.GRIDS_GROUP}/{grid_name}", attributes=entry)
    grid.create_array(sf.COORDS_ARRAY, data=coords, chunks=(min(len(coords), 65536) or 1, dims))
    grid.create_array(
        sf.TISSUE_ARRAY, data=np.ones(len(coords), np.float32), chunks=(min(len(coords), 65536) or 1,)
    )
    feat_attrs = {}
    for name, emb in (features or {}).items():
        fg = root.create_group(f"{sf.FEATURES_GROUP}/{name}")
        fg.create_array(
            sf.EMBEDDINGS_ARRAY, data=np.asarray(emb), chunks=(min(len(emb), 1024) or 1, emb.shape[1])
        )
        fg.create_array(sf.COORDS_ARRAY, data=coords, chunks=(min(len(coords), 65536) or 1, dims))
        feat_attrs[name] = {"grid": grid_name, "encoder": "test", "dim": int(emb.shape[1])}
    axes = ["c"] + (["z"] if dims == 3 else []) + ["y", "x"]
    root.attrs.update(
        {
            sf.OME_ATTR: {
                "version": "0.5",
                "multiscales": [
                    {
                        "name": path.stem,
                        "axes": [{"name": a, "type": "channel" if a == "c" else "space"} for a in axes],
                        "datasets": datasets,
                    }
                ],
            },
            sf.IPS_ATTR: {
                "format_version": sf.FORMAT_VERSION,
                "spatial_dims": dims,
                "channels": int(array.shape[0]),
                "spacing": None,
                "level_downsamples": [[2**k] * dims for k in range(n_levels)],
                "background": background,
                "mask": None,
                "grids": {grid_name: entry},
                "provenance": {"reader": "tests.loader_fixtures"},
                **({"features": feat_attrs} if feat_attrs else {}),
            },
        }
    )
    if complete:
        seal(path, [grid_name])
    return path


def seal(path: str | Path, grids: list[str] | None = None) -> None:
    """Write (or rewrite) the completion marker of a hand-made store, recording every array's files as
    `ips prep` does (call again after changing the store's arrays)."""
    from ips.format.store import seal as seal_store

    path = Path(path)
    if grids is None:
        grids = json.loads((path / sf.COMPLETE_MARKER).read_text()).get("grids", [])
    seal_store(path, grids)


def random_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A uint8 image `shape` `(C, *spatial)` that compresses somewhat (smooth field + noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 200, size=(shape[0],) + tuple(max(1, s // 8) for s in shape[1:]), dtype=np.uint8)
    img = coarse
    for ax in range(1, len(shape)):
        img = np.repeat(img, 8, axis=ax)
    img = img[(slice(None),) + tuple(slice(0, s) for s in shape[1:])]
    pad = [(0, 0)] + [(0, s - i) for s, i in zip(shape[1:], img.shape[1:])]
    img = np.pad(img, pad, mode="edge")
    return (img + rng.integers(0, 8, size=shape, dtype=np.uint8)).astype(np.uint8)


def write_big_store(path: str | Path, n_patches: int, *, patch: int = 16, tissue_rows: int = 1) -> Path:
    """A 2D store with >= `n_patches` grid patches whose chunks are mostly unwritten (cheap to make).

    The first `tissue_rows` shard rows hold random pixels (written chunks to decode); the rest is
    background. Returns the store path.
    """
    side = int(np.ceil(np.sqrt(n_patches)))
    shape = (3, side * patch, side * patch)
    store = write_store(
        path,
        np.zeros((3, 1, 1), np.uint8),
        patch_size=patch,
        write_chunks=False,
        coords=grid_coords(shape[1:], (patch, patch), (patch, patch))[:n_patches],
    )
    # replace the 1x1 level with the real (unwritten) level, then fill the tissue band
    root = zarr.open_group(store, mode="r+")
    del root["0"]
    chunk = (3, patch, patch)
    arr = root.create_array(
        "0",
        shape=shape,
        chunks=chunk,
        shards=(3, patch * SHARD_CHUNKS, patch * SHARD_CHUNKS),
        dtype="uint8",
        fill_value=255,
        config={"write_empty_chunks": False},
    )
    rows = min(shape[1], tissue_rows * patch * SHARD_CHUNKS)
    arr[:, :rows, :] = random_image((3, rows, shape[2]), seed=1)
    seal(store)
    return store


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM on Linux, else ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def rss_child(store: str, chunk_size: int, mode: str) -> None:
    """Run in a subprocess: one pass over the store's patches, then print JSON with the peak RSS.

    mode "stream": `stream_chunks` over a `ZarrPatchSource` (what the IPS loop does); mode "naive":
    read every patch into one tensor first (the reference implementation's way; the control).
    """
    from ips.data.streaming import stream_chunks
    from ips.data.zarr_source import ZarrPatchSource

    source = ZarrPatchSource(store)
    total = 0
    if mode == "stream":
        for chunk in stream_chunks(source, chunk_size, prefetch=2):
            total += int(chunk.patches[:, :, 0, 0].sum())
    else:
        everything = source.read(np.arange(len(source)))
        for start in range(0, len(source), chunk_size):
            total += int(everything[start : start + chunk_size, :, 0, 0].sum())
    print(json.dumps({"n": len(source), "peak_rss": peak_rss_bytes(), "checksum": total}))
