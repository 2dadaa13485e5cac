"""Slide / volume -> store: the pipeline behind `ips prep`, `convert_file` and `convert_array`.

Steps: read level 0 region by region (one shard per task, in threads) into the partial store; build the
pyramid from the store (2x mean); compute the tissue mask on a low level (or take the given one); make
the patch grid(s); write attributes; write the marker; rename into place; draw the thumbnail beside it.
A failure removes the partial store and raises `PrepError` with a one-line reason.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from data_prep.grid import make_grid
from data_prep.levels import LevelReader, level0_record
from data_prep.options import LOSSY_CODECS, PrepOptions, per_axis
from data_prep.pyramid import StreamingPyramid, level_shape, morton_order, plan_levels
from data_prep.readers import ArrayReader, ImageReader, open_reader, pyramid_warning
from data_prep.remote import open_writer
from data_prep.thumbnail import render_thumbnail, save_png
from data_prep.tissue import resample_mask, tissue_mask
from data_prep.writer import StoreWriter, chunk_layout, make_compressor, run_bounded, store_lock
from ips import __version__
from ips.errors import ConfigError, PrepError, StoreError
from ips.format.location import is_remote, zarr_store
from ips.format.names import (
    COORDS_ARRAY,
    FORMAT_VERSION,
    GRIDS_GROUP,
    IPS_ATTR,
    MASK_ARRAY,
    OME_ATTR,
    TISSUE_ARRAY,
)
from ips.format.store import Marker, is_complete, open_store, read_marker, seal
from ips.format.store import store_location as final_location

THUMBNAIL_SUFFIX = ".thumbnail.png"  # DIR/<slide_id>.thumbnail.png, beside the store
# extensions stripped (repeatedly) from a file name to make its slide_id
KNOWN_EXTENSIONS = {
    "svs",
    "tif",
    "tiff",
    "ome",
    "btf",
    "tf2",
    "tf8",
    "ndpi",
    "mrxs",
    "scn",
    "bif",
    "vms",
    "vmu",
    "svslide",
    "qptiff",
    "dcm",
    "nii",
    "gz",
    "npy",
    "isyntax",
}


@dataclass
class PrepResult:
    """What happened to one input (for the CLI's summary)."""

    source: str
    slide_id: str
    status: str  # "done", "skipped", "grid added", "failed"
    store: Path | str | None = None  # a URL for a store on object storage
    n_patches: int | None = None
    seconds: float = 0.0
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # one line each, about an input that was still converted


def slide_id_of(path: str | Path) -> str:
    """File name without its extension(s): `a.ome.tiff` -> `a`, `b.nii.gz` -> `b`, `c.x.svs` -> `c.x`
    (known image extensions are stripped repeatedly; an unknown one once)."""
    name = Path(path).name
    stem = name
    while "." in stem and stem.rsplit(".", 1)[1].lower() in KNOWN_EXTENSIONS:
        stem = stem.rsplit(".", 1)[0]
    if stem == name and "." in stem:
        stem = stem.rsplit(".", 1)[0]
    if not stem or stem.startswith("."):
        raise PrepError(f"cannot make a slide id from the file name {name!r}")
    return stem


# --- the pipeline ------------------------------------------------------------------------------------


def _hash_file(path: Path, out: dict[str, str]) -> None:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)  # releases the GIL: runs beside the decode threads
    out["sha256"] = h.hexdigest()


def _choose_level(options: PrepOptions, spatial: tuple[int, ...], spacing: tuple[float, ...] | None) -> int:
    """The grid's pyramid level: `options.level`, or the one nearest `options.mpp`."""
    possible = plan_levels(spatial, spacing, max_size=1, min_levels=1)  # every level the image allows
    if options.mpp is None:
        if options.level >= len(possible):
            raise PrepError(
                f"level {options.level} does not exist: a {spatial} image has levels 0..{len(possible) - 1}"
            )
        return options.level
    if spacing is None:
        raise PrepError(
            "no microns-per-pixel in the file's metadata, so --mpp cannot pick a level (give the scan's "
            "with --source-mpp X, or use --level)"
        )
    yx_um = [float(np.mean([s * f for s, f in zip(spacing[-2:], fac[-2:])])) for fac in possible]
    best = int(np.argmin([abs(math.log(u / options.mpp)) for u in yx_um]))
    if abs(yx_um[best] / options.mpp - 1) > options.mpp_tolerance:
        raise PrepError(
            f"no level within {options.mpp_tolerance:.0%} of {options.mpp} um/px (nearest: level "
            f"{best} at {yx_um[best]:.3g} um/px)"
        )
    return best


def _ome_attrs(
    name: str, dims: int, spacing: tuple[float, ...] | None, factors: list[tuple[int, ...]]
) -> dict[str, Any]:
    names = ["z", "y", "x"][-dims:]
    axes: list[dict[str, Any]] = [{"name": "c", "type": "channel"}]
    for n in names:
        axes.append({"name": n, "type": "space", **({"unit": "micrometer"} if spacing else {})})
    base = spacing or tuple([1.0] * dims)
    datasets = []
    for k, fac in enumerate(factors):
        transforms: list[dict[str, Any]] = [
            {"type": "scale", "scale": [1.0, *(s * f for s, f in zip(base, fac))]}
        ]
        if k:  # level-k pixel centres sit (f - 1) / 2 level-0 pixels in
            transforms.append(
                {"type": "translation", "translation": [0.0, *(s * (f - 1) / 2 for s, f in zip(base, fac))]}
            )
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
    return {
        "version": "0.5",
        "multiscales": [
            {
                "name": name,
                "axes": axes,
                "datasets": datasets,
                "type": "mean",
                "metadata": {"method": "2x mean, floor size (data_prep.pyramid)"},
            }
        ],
    }


def _first_level_within(
    factors: list[tuple[int, ...]], spatial: tuple[int, ...], limit: int, axes: slice
) -> int:
    for k, fac in enumerate(factors):
        if max(level_shape(spatial, fac)[axes]) <= limit:
            return k
    return len(factors) - 1


def _mask_level(
    options: PrepOptions,
    factors: list[tuple[int, ...]],
    spatial: tuple[int, ...],
    spacing: tuple[float, ...] | None,
) -> int:
    """The first level at `options.mask_mpp` (when the spacing is known) that is also within
    `mask_max_size` pixels on its longest side (y/x in 2D, all axes in 3D); else the coarsest level."""
    dims = len(spatial)
    limit = options.mask_max_size or (2048 if dims == 2 else 256)
    axes = slice(-2, None) if dims == 2 else slice(None)
    k = _first_level_within(factors, spatial, limit, axes)
    if spacing is not None and options.mask_mpp is not None:
        for j, fac in enumerate(factors):
            yx = min(s * f for s, f in zip(spacing[-2:], fac[-2:]))
            if yx >= 0.9 * options.mask_mpp or j == len(factors) - 1:
                return max(k, j)
    return k


def _grid_entry(
    options: PrepOptions,
    level: int,
    patch: tuple[int, ...],
    stride: tuple[int, ...],
    n: int,
    spacing: tuple[float, ...] | None,
    factor: tuple[int, ...],
) -> dict[str, Any]:
    return {
        "level": level,
        "patch_size": list(patch),
        "stride": list(stride),
        "min_tissue": options.min_tissue,
        "n_patches": n,
        "edge": "drop",
        "spacing": [s * f for s, f in zip(spacing, factor)] if spacing else None,
        "mpp_requested": options.mpp,
    }


def _write_grid(
    writer_group: zarr.Group, name: str, coords: np.ndarray, tissue: np.ndarray, entry: dict[str, Any]
) -> None:
    dims = coords.shape[1]
    grid = writer_group.require_group(GRIDS_GROUP).create_group(name, overwrite=True, attributes=entry)
    rows = max(1, min(len(coords), 1 << 18))
    grid.create_array(
        COORDS_ARRAY,
        shape=coords.shape,
        dtype=np.int64,
        chunks=(rows, dims),
        compressors=make_compressor("zstd"),
        fill_value=0,
    )
    grid.create_array(
        TISSUE_ARRAY,
        shape=tissue.shape,
        dtype=np.float32,
        chunks=(rows,),
        compressors=make_compressor("zstd"),
        fill_value=0.0,
    )
    if len(coords):
        grid[COORDS_ARRAY][...] = coords
        grid[TISSUE_ARRAY][...] = tissue


@dataclass(frozen=True)
class _Plan:
    """What one conversion writes, settled before any pixel is: the reader of the store's level 0, the
    pyramid's factors, the chunk and shard shapes, the grid's level, patch and stride."""

    slide_id: str
    options: PrepOptions
    reader: ImageReader
    grid_level: int
    patch: tuple[int, ...]
    stride: tuple[int, ...]
    factors: list[tuple[int, ...]]
    chunk: tuple[int, ...]
    shard: tuple[int, ...]

    @property
    def dims(self) -> int:
        return self.reader.spatial_dims

    @property
    def spatial(self) -> tuple[int, ...]:
        return self.reader.spatial_shape

    @property
    def spacing(self) -> tuple[float, ...] | None:
        return self.reader.spacing


def _plan(reader: ImageReader, options: PrepOptions, slide_id: str) -> _Plan:
    check_codec(options, reader)
    reader, grid_level = _store_reader(reader, options)
    dims, spatial = reader.spatial_dims, reader.spatial_shape
    patch = per_axis(options.patch_size, dims, "patch_size")
    stride = per_axis(options.stride if options.stride is not None else options.patch_size, dims, "stride")
    factors = plan_levels(
        spatial, reader.spacing, max_size=options.pyramid_max_size, min_levels=grid_level + 1
    )
    chunk, shard = chunk_layout(patch, stride, options.shard_chunks or (8 if dims == 2 else 4))
    return _Plan(
        slide_id=slide_id,
        options=options,
        reader=reader,
        grid_level=grid_level,
        patch=patch,
        stride=stride,
        factors=factors,
        chunk=chunk,
        shard=shard,
    )


@dataclass(frozen=True)
class _Mask:
    """The tissue mask as stored: `mask` `(*M)` bool, its `downsample` from level 0, and how it was made."""

    mask: np.ndarray
    downsample: tuple[int, ...]
    info: dict[str, Any]


def _ips_attrs(
    plan: _Plan, provenance: dict[str, Any], levels: list[zarr.Array], mask: _Mask, entry: dict[str, Any]
) -> dict[str, Any]:
    """The store's `ips` attributes (docs/FORMAT.md)."""
    reader, options = plan.reader, plan.options
    source = reader.source if isinstance(reader, LevelReader) else reader
    prov = {
        **provenance,
        "reader": source.name,
        "vendor": reader.vendor,
        "source_shape": list(source.shape),
        "source_dtype": str(reader.dtype),
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "options": options.to_dict(),
        **reader.metadata(),
        **({"mpp_override": source.mpp_override} if source.mpp_override else {}),
    }
    return {
        "format_version": FORMAT_VERSION,
        "spatial_dims": reader.spatial_dims,
        "channels": reader.shape[0],
        "dtype": str(reader.dtype),
        "spacing": list(plan.spacing) if plan.spacing else None,
        "level_downsamples": [list(f) for f in plan.factors],
        "level_shapes": [list(a.shape) for a in levels],
        "source_level": reader.record()
        if isinstance(reader, LevelReader)
        else level0_record(len(plan.factors[0])),
        "background": reader.background,
        "chunks": list(plan.chunk),
        "shards": list(plan.shard),
        "affine": reader.affine,
        "mask": {"downsample": list(mask.downsample), **mask.info},
        "grids": {options.grid_name: entry},
        "thumbnail": f"../{plan.slide_id}{THUMBNAIL_SUFFIX}" if options.thumbnail else None,
        "provenance": prov,
    }


def _mask(plan: _Plan, levels: list[zarr.Array], given: np.ndarray | None) -> _Mask:
    """The caller's mask resampled, or the tissue mask of a low level."""
    if given is not None:
        mask, downsample = _given_mask(given, plan.reader)
        return _Mask(mask, downsample, {"method": "given", "threshold": None, "level": None})
    options, factors = plan.options, plan.factors
    m = _mask_level(options, factors, plan.spatial, plan.spacing)
    mask, info = tissue_mask(
        levels[m][...],
        background=plan.reader.background,
        spacing=plan.spacing,
        downsample=factors[m],
        min_object_um2=options.min_object_um2,
        max_hole_um2=options.max_hole_um2,
    )
    return _Mask(mask, factors[m], {**info, "level": m})


def _run(
    reader: ImageReader,
    writer: StoreWriter,
    options: PrepOptions,
    *,
    slide_id: str,
    provenance: Callable[[], dict[str, Any]],
    given_mask: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[Path, int]:
    """Convert `reader` into `writer`'s partial store and commit it. Returns `(store, n_patches)`.

    `provenance()` is called once the pixels are written (so a source hash can run meanwhile).
    """
    plan = _plan(reader, options, slide_id)
    reader, dims = plan.reader, plan.dims
    compressor = make_compressor(options.codec, options.codec_level)
    group = writer.begin()
    levels = [
        writer.image_array(
            str(k),
            (reader.shape[0], *level_shape(plan.spatial, f)),
            reader.dtype,
            chunks=plan.chunk,
            shards=plan.shard,
            fill_value=reader.background,
            compressor=compressor,
        )
        for k, f in enumerate(plan.factors)
    ]
    _write_levels(plan, writer, levels, progress)

    mask = _mask(plan, levels, given_mask)  # on a low level (or the caller's mask)
    writer.small_array(
        MASK_ARRAY,
        mask.mask.astype(np.uint8),
        chunk_rows=512 if dims == 2 else 64,
        dimension_names=["z", "y", "x"][-dims:],
    )
    coords, entry = _grid(group, plan, mask)
    group.attrs.update(
        {
            OME_ATTR: _ome_attrs(slide_id, dims, plan.spacing, plan.factors),
            IPS_ATTR: _ips_attrs(plan, provenance(), levels, mask, entry),
        }
    )
    if options.thumbnail:
        thumb = writer.staging(f"{slide_id}{THUMBNAIL_SUFFIX}")
        _thumbnail(plan, levels, mask, coords, entry, thumb)
    store = writer.commit([options.grid_name])
    if options.thumbnail:
        writer.publish(thumb, f"{slide_id}{THUMBNAIL_SUFFIX}")
    return store, len(coords)


def check_codec(options: PrepOptions, reader: ImageReader) -> None:
    """ConfigError naming --codec when a lossy codec is asked for an image it cannot code (it takes 2D
    uint8 images with 1 or 3 channels: RGB slides, grey images; WebP RGB only)."""
    if options.codec not in LOSSY_CODECS:
        return
    dims, dtype, channels = reader.spatial_dims, np.dtype(reader.dtype), reader.shape[0]
    if dims != 2 or dtype != np.uint8 or channels not in (1, 3):
        raise ConfigError(
            f"--codec {options.codec}: lossy codecs take 2D uint8 images with 1 or 3 channels, not this "
            f"{dims}D {dtype} image with {channels} channels; use blosc-lz4, zstd or none"
        )
    if options.codec == "webp" and channels != 3:
        raise ConfigError("--codec webp: WebP codes RGB only, not 1-channel images; use jpeg or jpegxl")


def _given_mask(given: np.ndarray, reader: ImageReader) -> tuple[np.ndarray, tuple[int, ...]]:
    """A caller's mask (over the source's level 0) as `(mask, downsample from the store's level 0)`.

    A store that begins at a source level (factor f) needs mask factors that are multiples of f: a finer
    mask is reduced by majority over blocks (`(M)` -> `(ceil(M / r))`) until they are."""
    source = reader.source if isinstance(reader, LevelReader) else reader
    mask, ds = resample_mask(given, source.spatial_shape)
    factor = reader.factor if isinstance(reader, LevelReader) else (1,) * len(ds)
    blocks = tuple(f // math.gcd(d, f) for d, f in zip(ds, factor))
    if any(b > 1 for b in blocks):
        padded = np.zeros([-(-n // b) * b for n, b in zip(mask.shape, blocks)], np.float32)
        padded[tuple(slice(0, n) for n in mask.shape)] = mask
        split = [v for n, b in zip(padded.shape, blocks) for v in (n // b, b)]
        mask = padded.reshape(split).mean(axis=tuple(range(1, 2 * len(blocks), 2))) >= 0.5
        ds = tuple(d * b for d, b in zip(ds, blocks))
    return mask, tuple(d // f for d, f in zip(ds, factor))


def _store_reader(reader: ImageReader, options: PrepOptions) -> tuple[ImageReader, int]:
    """`(reader of the store's level 0, grid level in the store)`: with `store_from` grid, the source
    seen from the grid's level (`data_prep.levels`) and grid level 0; else the source as it is."""
    grid_level = _choose_level(options, reader.spatial_shape, reader.spacing)
    if options.store_from != "grid" or grid_level == 0:
        return reader, grid_level
    every = plan_levels(reader.spatial_shape, reader.spacing, max_size=1, min_levels=grid_level + 1)
    return LevelReader(reader, every, grid_level), 0


def _grid(group: Any, plan: _Plan, mask: _Mask) -> tuple[np.ndarray, dict[str, Any]]:
    """The patch grid from the tissue mask, written into the store; PrepError when it is empty (unless
    `allow_empty`). Returns the coordinates and the grid's attributes."""
    options, level, factor = plan.options, plan.grid_level, plan.factors[plan.grid_level]
    coords, tissue = make_grid(
        mask.mask,
        mask.downsample,
        level_shape=level_shape(plan.spatial, factor),
        level_downsample=factor,
        patch=plan.patch,
        stride=plan.stride,
        min_tissue=options.min_tissue,
    )
    if len(coords) == 0 and not options.allow_empty:
        raise PrepError(
            f"no tissue: grid {options.grid_name!r} is empty (min_tissue {options.min_tissue}, "
            f"level {level}, patch {plan.patch}; the mask covers {mask.mask.mean():.1%} of the image)"
        )
    entry = _grid_entry(
        options,
        level,
        patch=plan.patch,
        stride=plan.stride,
        n=len(coords),
        spacing=plan.spacing,
        factor=factor,
    )
    _write_grid(group, options.grid_name, coords, tissue, entry)
    return coords, entry


def _write_levels(
    plan: _Plan, writer: StoreWriter, levels: list[Any], progress: Callable[[int], None] | None
) -> None:
    """Every pyramid level, from one pass over the source's level 0."""
    reader, spatial, shard = plan.reader, plan.spatial, plan.shard
    # level 0, one task per shard (decode in the reader, encode in ShardEncoder) on `threads` threads, in
    # Z-order so the pyramid above is built chunk by chunk from each shard (no read-back; few chunks held)
    encoders = [writer.encoder(str(k), a) for k, a in enumerate(levels)]

    pyramid = StreamingPyramid(encoders, plan.factors)

    def copy_shard(idx: tuple[int, ...]) -> Callable[[], None]:
        def task() -> None:
            start = tuple(i * s for i, s in zip(idx, shard))
            size = tuple(min(s, n - o) for s, n, o in zip(shard, spatial, start))
            block = reader.read_region(start, size)
            encoders[0].write(start, block)
            pyramid.add(start, block)

        return task

    grid0 = tuple(-(-n // s) for n, s in zip(spatial, shard))
    tick = (lambda: progress(1)) if progress else None
    run_bounded((copy_shard(idx) for idx in morton_order(grid0)), plan.options.n_threads, tick)
    assert pyramid.pending == 0


def _thumbnail(
    plan: _Plan,
    levels: list[zarr.Array],
    mask: _Mask,
    coords: np.ndarray,
    entry: dict[str, Any],
    path: Path,
) -> None:
    """Render the thumbnail (the first level within `thumbnail_size`) with the grid's patches; save it
    at `path`."""
    factors = plan.factors
    t = _first_level_within(factors, plan.spatial, plan.options.thumbnail_size, slice(-2, None))
    g = entry["level"]
    scale = [a / b for a, b in zip(factors[g][-2:], factors[t][-2:])]  # grid-level px -> thumbnail px
    yx = coords[:, -2:].astype(np.float64)
    py, px = entry["patch_size"][-2:]
    boxes = (
        np.stack(
            [
                yx[:, 0] * scale[0],
                yx[:, 1] * scale[1],
                (yx[:, 0] + py) * scale[0],
                (yx[:, 1] + px) * scale[1],
            ],
            axis=1,
        )
        if len(yx)
        else np.zeros((0, 4))
    )
    size = "x".join(str(p) for p in entry["patch_size"])
    caption = (
        f"{plan.slide_id}: {entry['n_patches']} patches of {size} at level {g}, "
        f"min tissue {entry['min_tissue']}"
    )
    rgb = render_thumbnail(
        levels[t][...], mask.mask, boxes, background=plan.reader.background, caption=caption
    )
    save_png(rgb, path)


def _failure_reason(e: BaseException) -> str:
    if isinstance(e, (PrepError, ConfigError)):
        return str(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "disk full (ENOSPC) while writing the store"
    if isinstance(e, OSError):
        return f"I/O error: {e.strerror or e}"
    if isinstance(e, MemoryError):
        return "out of memory"
    return f"{type(e).__name__}: {e}"


def add_grid(store: str | Path, options: PrepOptions) -> int:
    """Add grid `options.grid_name` to a complete store (from its mask and pyramid); returns its N.

    The grid counts once the marker lists it: a crash before that leaves the store as it was.
    """
    store = store if is_remote(store) else Path(store)
    opened = open_store(store, mode="r+")  # checked: the mask below is the one prep recorded
    group = opened.group
    attrs = dict(opened.attrs)
    dims = attrs["spatial_dims"]
    factors = [tuple(f) for f in attrs["level_downsamples"]]
    shapes = [tuple(s[1:]) for s in attrs["level_shapes"]]
    spacing = tuple(attrs["spacing"]) if attrs.get("spacing") else None
    patch = per_axis(options.patch_size, dims, "patch_size")
    stride = per_axis(options.stride if options.stride is not None else options.patch_size, dims, "stride")
    level = _level_in_store(options, attrs)
    if level >= len(factors):
        raise PrepError(
            f"level {level} is not in the store (levels 0..{len(factors) - 1}); "
            "rerun with --overwrite to rebuild the pyramid"
        )
    stored_mask = opened.mask()
    if stored_mask is None:
        raise PrepError(
            f"{store}: the store has no tissue mask to make a grid from; rebuild it with --overwrite"
        )
    mask = np.asarray(stored_mask).astype(bool)
    coords, tissue = make_grid(
        mask,
        tuple(attrs["mask"]["downsample"]),
        shapes[level],
        factors[level],
        patch,
        stride,
        options.min_tissue,
    )
    if len(coords) == 0 and not options.allow_empty:
        raise PrepError(f"no tissue: grid {options.grid_name!r} is empty (min_tissue {options.min_tissue})")
    entry = _grid_entry(
        options, level, patch=patch, stride=stride, n=len(coords), spacing=spacing, factor=factors[level]
    )
    _write_grid(group, options.grid_name, coords, tissue, entry)
    attrs["grids"] = {**attrs.get("grids", {}), options.grid_name: entry}
    group.attrs.update({IPS_ATTR: attrs})
    _list_grid(store, options.grid_name)
    return len(coords)


def _level_in_store(options: PrepOptions, attrs: dict[str, Any]) -> int:
    """The grid level `options` ask for (`level` counts the source's pyramid, `mpp` is physical) as a
    level of a store whose level 0 may be a source level (`ips.source_level`, `--store-from grid`)."""
    shape0 = tuple(attrs["level_shapes"][0][1:])
    spacing = tuple(attrs["spacing"]) if attrs.get("spacing") else None
    offset = int((attrs.get("source_level") or {}).get("pyramid_level", 0))
    if options.mpp is not None or offset == 0:
        return _choose_level(options, shape0, spacing)
    if options.level < offset:
        raise PrepError(
            f"level {options.level} is finer than the store's level 0 (source level {offset}, "
            "--store-from grid); rerun with --overwrite to rebuild it"
        )
    return _choose_level(dataclasses.replace(options, level=options.level - offset), shape0, spacing)


def _list_grid(store: Path | str, name: str) -> None:
    """Record grid `name`'s arrays in the marker and list the grid: the step that makes it count."""
    grid_arrays = [f"{GRIDS_GROUP}/{name}/{COORDS_ARRAY}", f"{GRIDS_GROUP}/{name}/{TISSUE_ARRAY}"]
    seal(store, [*_marker(store).grids, name], only=grid_arrays)


def _marker(store: Path | str) -> Marker:
    """The marker of a complete store (StoreError when it is damaged)."""
    marker = read_marker(store)
    if marker is None:
        raise StoreError(f"{store}: incomplete store (no completion marker)")
    return marker


# options that shape a grid / a store: a complete store made with other values is not what was asked for
_STORE_OPTIONS = (
    "store_from",
    "codec",
    "codec_level",
    "shard_chunks",
    "pyramid_max_size",
    "mask_max_size",
    "mask_mpp",
    "min_object_um2",
    "max_hole_um2",
)


def options_mismatch(store: Path | str, options: PrepOptions) -> str | None:
    """Why the complete `store` is not what `options` ask for (its grid `options.grid_name` or its
    pyramid / mask / codec were made with other values), or None when it is."""
    group = zarr.open_group(zarr_store(store), mode="r")
    attrs = dict(group.attrs.get(IPS_ATTR) or {})
    entry = (attrs.get("grids") or {}).get(options.grid_name)
    made = (attrs.get("provenance") or {}).get("options") or {}
    diffs = []
    if entry is not None:
        dims = int(attrs["spatial_dims"])
        patch = per_axis(options.patch_size, dims, "patch_size")
        stride = per_axis(
            options.stride if options.stride is not None else options.patch_size, dims, "stride"
        )
        try:
            level: object = _level_in_store(options, attrs)
        except PrepError:
            level = f"mpp {options.mpp}" if options.mpp is not None else options.level
        asked = {
            "patch_size": list(patch),
            "stride": list(stride),
            "level": level,
            "min_tissue": options.min_tissue,
        }
        diffs += [(k, entry.get(k), v) for k, v in asked.items() if entry.get(k) != v]
    diffs += [
        (k, made[k], getattr(options, k))
        for k in _STORE_OPTIONS
        if k in made and made[k] != getattr(options, k)
    ]
    if not diffs:
        return None
    said = ", ".join(f"{k} {_fmt(old)} (this run: {_fmt(new)})" for k, old, new in diffs)
    return (
        f"the complete store {store} was made with {said}; kept as it is: rerun with --overwrite to "
        f"rebuild it, or add a grid with another --grid-name"
    )


def _fmt(value: object) -> str:
    if isinstance(value, list) and len(set(map(str, value))) == 1:
        return str(value[0])
    return str(value)


def prep_file(
    path: str | Path,
    out_dir: str | Path,
    *,
    options: PrepOptions | None = None,
    reader: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> PrepResult:
    """Convert one file, never raising for a bad input: the result says done / skipped / grid added /
    failed, and why. A complete store is skipped (or gets the new grid) unless `options.overwrite`; one
    made with other options fails, naming them and `--overwrite`. The store's `StoreLock` is held
    throughout: a second prep of the same output fails at once, naming the holder."""
    options = options or PrepOptions()
    t0 = time.perf_counter()
    path = Path(path)
    try:
        slide_id = slide_id_of(path)
    except PrepError as e:
        return PrepResult(str(path), path.name, "failed", reason=str(e))
    final = final_location(out_dir, slide_id)
    try:
        with store_lock(out_dir, slide_id):
            return _prep_locked(
                path, out_dir, slide_id, options=options, reader=reader, progress=progress, t0=t0
            )
    except PrepError as e:  # the lock is held by another prep
        return PrepResult(
            str(path), slide_id, "failed", final, reason=str(e), seconds=time.perf_counter() - t0
        )


def _prep_locked(
    path: Path,
    out_dir: str | Path,
    slide_id: str,
    options: PrepOptions,
    reader: str | None,
    progress: Callable[[int], None] | None,
    t0: float,
) -> PrepResult:
    final = final_location(out_dir, slide_id)
    if is_complete(final) and not options.overwrite:
        try:
            return _existing(path, final, slide_id, options, t0)
        except Exception as e:  # noqa: BLE001 - reported per input
            return PrepResult(
                str(path),
                slide_id,
                "failed",
                final,
                reason=_failure_reason(e),
                seconds=time.perf_counter() - t0,
            )
    writer = open_writer(out_dir, slide_id)
    digest: dict[str, str] = {}
    try:
        with open_reader(path, reader, mpp=options.source_mpp) as r:
            notes = tuple(w for w in [pyramid_warning(r, options.pyramid_max_size)] if w)
            hasher = threading.Thread(target=_hash_file, args=(path, digest), daemon=True)
            if options.hash_source:
                hasher.start()

            def provenance() -> dict[str, Any]:
                if options.hash_source:
                    hasher.join()
                return {
                    "source_path": str(path.resolve()),
                    "source_size_bytes": path.stat().st_size,
                    "source_sha256": digest.get("sha256"),
                }

            store, n = _run(r, writer, options, slide_id=slide_id, provenance=provenance, progress=progress)
    except BaseException as e:
        writer.abort()  # the partial store and the staged thumbnail
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: clean up, then stop
            raise
        return PrepResult(
            str(path), slide_id, "failed", reason=_failure_reason(e), seconds=time.perf_counter() - t0
        )
    return PrepResult(str(path), slide_id, "done", store, n, time.perf_counter() - t0, warnings=notes)


def _existing(path: Path, final: Path | str, slide_id: str, options: PrepOptions, t0: float) -> PrepResult:
    """A complete store is there: skip it, add the grid, or say why it is not what was asked for."""
    mismatch = options_mismatch(final, options)
    if mismatch:
        return PrepResult(str(path), slide_id, "failed", final, reason=mismatch)
    if options.grid_name in _marker(final).grids:
        return PrepResult(str(path), slide_id, "skipped", final, reason="complete store exists")
    n = add_grid(final, options)
    return PrepResult(str(path), slide_id, "grid added", final, n, time.perf_counter() - t0)


def convert_file(
    path: str | Path, out_dir: str | Path, *, options: PrepOptions | None = None, reader: str | None = None
) -> Path:
    """Convert one slide or volume file to `out_dir/<slide_id>.zarr`; returns the store path.

    `reader`: a backend name from `data_prep.readers.READERS` (default: chosen from the content).
    A complete store is kept (and gets `options.grid_name` if it lacks it) unless `options.overwrite`.
    Raises PrepError("<path>: <reason>") when the input cannot be converted.
    """
    result = prep_file(path, out_dir, options=options, reader=reader)
    if result.status == "failed":
        raise PrepError(f"{path}: {result.reason}")
    assert result.store is not None
    return result.store


def convert_array(
    array: np.ndarray,
    out_dir: str | Path,
    slide_id: str,
    *,
    spacing: tuple[float, ...] | None = None,
    options: PrepOptions | None = None,
    background: float | None = None,
    mask: np.ndarray | None = None,
) -> Path:
    """Convert an in-memory image with the same pipeline as files; returns the store path.

    Args:
        array: `(C, Y, X)` (2D) or `(C, Z, Y, X)` (3D), uint8 for slides or any numeric dtype.
        slide_id: the store's name (`out_dir/<slide_id>.zarr`).
        spacing: micrometers per pixel `(sy, sx)` / `(sz, sy, sx)` (None: unknown; `options.mpp` then fails).
        background: fill value of empty space (default 255 for 3-channel uint8 2D, else 0).
        mask: tissue mask (bool or 0/1) at level 0 or downsampled by integer factors (each side
            `ceil(n / f)` or `n // f`); default: computed as for files.
    Raises:
        ValueError (bad arguments), PrepError (e.g. empty grid, disk full).
    """
    options = options or PrepOptions()
    if not slide_id or "/" in slide_id or slide_id.startswith("."):
        raise ValueError(f"slide_id must be a plain name, got {slide_id!r}")
    reader = ArrayReader(np.asarray(array), spacing=spacing, background=background)
    if mask is not None:
        resample_mask(mask, reader.spatial_shape)  # validate before writing anything
    final = final_location(out_dir, slide_id)
    with store_lock(out_dir, slide_id):
        if is_complete(final) and not options.overwrite:
            if options.grid_name not in _marker(final).grids:
                add_grid(final, options)
            return final
        return _convert_array_locked(array, reader, out_dir, slide_id, options, mask)


def _convert_array_locked(
    array: np.ndarray,
    reader: ArrayReader,
    out_dir: str | Path,
    slide_id: str,
    options: PrepOptions,
    mask: np.ndarray | None,
) -> Path:
    def provenance() -> dict[str, Any]:
        digest = hashlib.sha256(np.ascontiguousarray(array).data).hexdigest() if options.hash_source else None
        return {"source_path": None, "source_size_bytes": int(reader._array.nbytes), "source_sha256": digest}

    writer = open_writer(out_dir, slide_id)
    try:
        store, _ = _run(reader, writer, options, slide_id=slide_id, provenance=provenance, given_mask=mask)
    except BaseException as e:
        writer.abort()  # the partial store and the staged thumbnail
        if isinstance(e, (PrepError, ValueError)) or not isinstance(e, Exception):
            raise
        raise PrepError(f"{slide_id}: {_failure_reason(e)}") from e
    return store
