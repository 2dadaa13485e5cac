"""Annotations as per-patch labels: QuPath GeoJSON polygons (level-0 pixels) or a mask image, mapped onto
a store's patch grid at any level.

A patch's label is the fraction of its footprint (in level-0 pixels) inside the annotation, in [0, 1].
Only patches that touch the annotation are kept (`PatchLabels`: indices and fractions), so memory grows
with the annotated area, not with the slide. Polygons are rasterised at `RASTER_PER_PATCH` samples per
patch side, over the grid's bounding box only.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ips.data.store import IpsStore, open_store
from ips.errors import ManifestError, one_line

RASTER_PER_PATCH = 8  # samples per patch side when rasterising polygons: fractions in steps of 1/64
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".npy", ".jpg", ".jpeg")
# QuPath classes whose polygons are not the region (kept in the file for the record; `ips view` draws them)
NOT_REGION_CLASSES = ("Not tumor", "Ignore*")


@dataclass(frozen=True)
class PatchLabels:
    """Per-patch annotation of one grid: `indices (k,)` int64 of the patches that touch the annotation,
    `fractions (k,)` float32 in (0, 1] of their footprint inside it; every other patch is 0."""

    n_patches: int
    indices: np.ndarray
    fractions: np.ndarray

    def dense(self) -> np.ndarray:
        """`(N,)` float32: the fraction of every patch (O(N): for tests and small grids)."""
        out = np.zeros(self.n_patches, dtype=np.float32)
        out[self.indices] = self.fractions
        return out

    def of(self, patch_indices: np.ndarray) -> np.ndarray:
        """Fractions of the given patches `(m,)` -> `(m,)` float32."""
        patch_indices = np.asarray(patch_indices, dtype=np.int64)
        if not len(self.indices):
            return np.zeros(len(patch_indices), dtype=np.float32)
        pos = np.minimum(np.searchsorted(self.indices, patch_indices), len(self.indices) - 1)
        return np.where(self.indices[pos] == patch_indices, self.fractions[pos], 0.0).astype(np.float32)

    def positives(self, threshold: float = 0.5) -> np.ndarray:
        """Indices of the patches at least `threshold` inside the annotation, ascending."""
        return self.indices[self.fractions >= threshold]


def patch_labels(
    annotation: str | Path, store: str | Path | IpsStore, grid: str, *, slide: str | None = None
) -> PatchLabels:
    """Map the annotation file onto `grid` of `store` (a path, or a store already open); ManifestError
    naming the file and the slide (`slide`, else the store's name) when it is unusable or cannot be right:
    malformed geometry, coordinates outside the slide (negative, beyond its extent, NaN, not 2D), a
    polygon that touches no patch, a mask whose size matches none of the slide's levels."""
    path = Path(annotation)
    if not path.is_file():
        raise ManifestError(f"annotation {path} does not exist")
    opened = store if isinstance(store, IpsStore) else open_store(store)
    where = f"annotation {path} of slide {slide or opened.name}"
    info = opened.grid(grid)
    coords = np.asarray(opened.coords(grid), dtype=np.int64)
    down = opened.level_downsample(info.level)
    lo = coords * down  # (N, dims) level-0 top-left corners
    size = np.asarray(info.patch_size, dtype=np.float64) * down  # level-0 footprint of one patch
    level0 = [int(v) for v in opened.level(0).shape[1:]]
    extent = np.asarray(level0, dtype=np.float64) * opened.source_downsample  # source level-0 extent
    if path.suffix.lower() in (".geojson", ".json"):
        if opened.spatial_dims != 2:
            raise ManifestError(f"{where}: GeoJSON polygons annotate 2D slides; give a mask for 3D")
        polygons = _read_polygons(path, where)
        _check_inside(polygons, extent, where)
        fractions = _polygon_fractions(polygons, lo, size)
        if len(polygons) and not (fractions > 0).any():
            raise ManifestError(
                f"{where}: its polygons touch none of the {len(coords)} patches of grid {grid!r} (wrong "
                "slide, or coordinates at another level than level 0?)"
            )
    elif path.suffix.lower() in MASK_SUFFIXES:
        mask = _read_mask(path, opened.spatial_dims, extent, size, where)
        fractions = _mask_fractions(mask, tuple(extent), lo, size)
    else:
        raise ManifestError(
            f"{where}: unknown kind {path.suffix!r}; use QuPath GeoJSON (.geojson) or "
            f"a mask ({', '.join(MASK_SUFFIXES)})"
        )
    keep = np.flatnonzero(fractions > 0)
    return PatchLabels(len(coords), keep.astype(np.int64), fractions[keep].astype(np.float32))


def _ring(ring: object, where: str) -> np.ndarray:
    """One GeoJSON ring as `(k, 2)` float64 (x, y); ManifestError saying what is wrong with it."""
    if not isinstance(ring, list) or not ring:
        raise ManifestError(
            f"{where}: a polygon ring is {'empty' if ring == [] else repr(ring)[:40]}, not a list of points"
        )
    for point in ring:
        if not isinstance(point, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in point
        ):
            raise ManifestError(f"{where}: point {repr(point)[:40]} is not a pair of numbers [x, y]")
        if len(point) != 2:
            raise ManifestError(
                f"{where}: point {point} has {len(point)} coordinates; polygons are 2D [x, y]"
            )
    points = np.asarray(ring, dtype=np.float64)
    if not np.isfinite(points).all():
        raise ManifestError(f"{where}: a point is NaN or infinite")
    if len(np.unique(points, axis=0)) < 3:
        raise ManifestError(
            f"{where}: a ring of {len(points)} point(s) encloses no area (a polygon needs 3 or more)"
        )
    return points


def _read_polygons(path: Path, where: str) -> list[list[np.ndarray]]:
    """Polygons as lists of rings `(k, 2)` in (row, col) level-0 pixels: the outer ring, then holes."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(f"{where}: not valid JSON ({one_line(e)})") from None
    geometries = []
    items = data.get("features", [data]) if isinstance(data, dict) else data
    for item in items if isinstance(items, list) else []:
        if _class_name(item) in NOT_REGION_CLASSES:
            continue
        geometry = item.get("geometry", item) if isinstance(item, dict) else None
        if isinstance(geometry, dict):
            geometries.append(geometry)
    polygons: list[list[np.ndarray]] = []
    for g in geometries:
        kind, coords = g.get("type"), g.get("coordinates")
        if kind not in ("Polygon", "MultiPolygon"):
            continue  # points, lines: no area to label
        if not isinstance(coords, list) or not coords:
            raise ManifestError(f"{where}: a {kind} has coordinates {repr(coords)[:40]}, not a list of rings")
        parts = [coords] if kind == "Polygon" else coords
        for rings in parts:
            if not isinstance(rings, list) or not rings or not all(isinstance(r, list) for r in rings):
                raise ManifestError(f"{where}: a {kind} part {repr(rings)[:40]} is not a list of rings")
            # GeoJSON (and QuPath) write (x, y): the one place they become (row, col)
            polygons.append([_ring(ring, where)[:, ::-1] for ring in rings])
    if not polygons:
        raise ManifestError(f"{where}: no Polygon or MultiPolygon geometry found")
    return polygons


def _class_name(item: object) -> object:
    """A Feature's `properties.classification.name` (QuPath), or None."""
    props = item.get("properties") if isinstance(item, dict) else None
    cls = props.get("classification") if isinstance(props, dict) else None
    return cls.get("name") if isinstance(cls, dict) else None


def _check_inside(polygons: list[list[np.ndarray]], extent: np.ndarray, where: str) -> None:
    """Every vertex within the slide's level-0 extent `(rows, cols)` (a pixel of slack for rounding)."""
    points = np.concatenate([ring for rings in polygons for ring in rings])
    low, high = points.min(axis=0), points.max(axis=0)
    if (low < -1).any() or (high > extent + 1).any():
        raise ManifestError(
            f"{where}: coordinates span x {low[1]:g}..{high[1]:g}, y {low[0]:g}..{high[0]:g}, outside the "
            f"slide's level-0 extent {extent[1]:g} x {extent[0]:g} pixels"
        )


def _polygon_fractions(polygons: list[list[np.ndarray]], lo: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Fraction of each patch box `[lo, lo + size)` inside the union of the polygons (holes cut out)."""
    from skimage.draw import polygon as fill

    step = size / RASTER_PER_PATCH  # level-0 pixels per raster sample
    origin = lo.min(axis=0).astype(np.float64)
    shape = tuple(int(v) for v in np.ceil((lo.max(axis=0) + size - origin) / step))
    raster = np.zeros(shape, dtype=np.int8)
    for rings in polygons:
        for k, ring in enumerate(rings):
            # sample centres: raster cell i covers [origin + i*step, origin + (i+1)*step)
            r = (ring[:, 0] - origin[0]) / step[0] - 0.5
            c = (ring[:, 1] - origin[1]) / step[1] - 0.5
            rr, cc = fill(r, c, shape=shape)
            raster[rr, cc] = 0 if k else 1
    cells = np.rint((lo - origin) / step).astype(np.int64)  # (N, 2) first raster cell of each patch
    n = RASTER_PER_PATCH
    blocks = np.lib.stride_tricks.sliding_window_view(np.pad(raster, ((0, n), (0, n))), (n, n))
    return blocks[cells[:, 0], cells[:, 1]].mean(axis=(1, 2)).astype(np.float32)


@contextlib.contextmanager
def _unlimited_pil() -> Iterator[None]:
    """PIL's decompression-bomb limit off for a while: the mask's size is bounded by the slide's instead
    (a mask must match one of its levels), so a large slide's level-0 mask still opens."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _mask_shape(path: Path) -> tuple[int, ...]:
    """The stored shape of a mask image, read from its header (no pixels decoded)."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    if suffix in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return tuple(tif.series[0].shape)
    from PIL import Image

    with _unlimited_pil(), Image.open(path) as im:  # a header only: the size is judged by the caller
        channels = len(im.getbands())
        return (im.height, im.width) + ((channels,) if channels > 1 else ())


def _check_mask_scale(spatial: tuple[int, ...], extent: np.ndarray, patch: np.ndarray, where: str) -> None:
    """A mask is the slide at one scale: one factor f (level-0 pixels per mask pixel, the same on every
    axis, up to rounding) with 1 <= f <= a patch's side. ManifestError otherwise: another aspect (10 x 1000
    for a square slide), larger than level 0 (a 30000 x 30000 PNG for a small slide), or coarser than a
    patch (1 x 1), each of which would stretch a few pixels over many patches."""
    size = np.asarray(spatial, dtype=np.float64)
    # per axis, the factors f for which extent / f rounds to the mask's size: extent/(n+1) < f < extent/(n-1)
    low = float(np.max(extent / (size + 1)))
    high = float(np.min(np.where(size > 1, extent / np.maximum(size - 1, 1e-9), np.inf)))
    shape = " x ".join(map(str, spatial))
    slide = " x ".join(f"{v:g}" for v in extent)
    if low >= high:
        raise ManifestError(
            f"{where}: mask size {shape} is not the slide ({slide} level-0 pixels) at one scale (another "
            "aspect ratio); draw it over the whole slide at one of its levels"
        )
    if high < 1:
        raise ManifestError(f"{where}: mask size {shape} is larger than the slide ({slide} level-0 pixels)")
    if low >= float(patch.min()):
        raise ManifestError(
            f"{where}: mask size {shape} is coarser than a patch ({low:g} level-0 pixels per mask pixel, "
            f"patches {patch.min():g}); draw it at a level where a patch spans pixels"
        )


def _read_mask(path: Path, dims: int, extent: np.ndarray, patch: np.ndarray, where: str) -> np.ndarray:
    """The mask `(spatial...)` bool, checked against the slide before its pixels are decoded: the slide
    at one scale (`_check_mask_scale`), never stretched to fit."""
    try:
        shape = _mask_shape(path)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line
        raise ManifestError(f"{where}: cannot read the mask ({one_line(e)})") from None
    spatial = shape[:dims] if len(shape) == dims + 1 and shape[-1] <= 4 else shape
    if len(spatial) != dims:
        raise ManifestError(
            f"{where}: mask has shape {shape}; expected {dims} spatial dimensions (plus at most 4 "
            "channels last)"
        )
    _check_mask_scale(spatial, extent, patch, where)
    try:
        if path.suffix.lower() == ".npy":
            mask = np.load(path, allow_pickle=False)
        elif path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            mask = tifffile.imread(path)
        else:
            from PIL import Image

            with _unlimited_pil(), Image.open(path) as im:  # its size was checked against the slide's
                mask = np.asarray(im)
    except Exception as e:  # noqa: BLE001 - a damaged file: one line
        raise ManifestError(f"{where}: cannot read the mask ({one_line(e)})") from None
    if mask.ndim == dims + 1:  # channels last (RGB PNG): any channel set counts
        mask = mask.max(axis=-1)
    return mask > 0


def _mask_fractions(
    mask: np.ndarray, level0: tuple[int, ...], lo: np.ndarray, size: np.ndarray
) -> np.ndarray:
    """Fraction of each patch box inside a mask that covers the whole level-0 extent at its own scale."""
    scale = np.asarray(mask.shape, dtype=np.float64) / np.asarray(level0, dtype=np.float64)
    a = np.clip(np.floor(lo * scale).astype(np.int64), 0, np.asarray(mask.shape) - 1)
    b = np.clip(np.ceil((lo + size) * scale).astype(np.int64), a + 1, np.asarray(mask.shape))
    # an integral image gives each box's sum in O(1): memory of one mask, not of N boxes
    integral = np.pad(mask.astype(np.int64), [(1, 0)] * mask.ndim)
    for axis in range(mask.ndim):
        integral = integral.cumsum(axis=axis)
    total = np.zeros(len(lo), dtype=np.float64)
    for corner in np.ndindex(*([2] * mask.ndim)):
        idx = tuple(np.where(np.asarray(corner)[d] == 1, b[:, d], a[:, d]) for d in range(mask.ndim))
        sign = (-1) ** (mask.ndim - sum(corner))
        total += sign * integral[idx]
    return (total / np.prod(b - a, axis=1)).astype(np.float32)
