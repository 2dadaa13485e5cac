"""Annotations as per-patch labels: QuPath GeoJSON polygons (level-0 pixels) or a mask image, mapped onto
a store's patch grid at any level.

A patch's label is the fraction of its footprint (in level-0 pixels) inside the annotation, in [0, 1].
Only patches that touch the annotation are kept (`PatchLabels`: indices and fractions), so memory grows
with the annotated area, not with the slide. Polygons are rasterised at `RASTER_PER_PATCH` samples per
patch side, over the grid's bounding box only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ips.data.store import IpsStore, open_store
from ips.errors import ManifestError

RASTER_PER_PATCH = 8  # samples per patch side when rasterising polygons: fractions in steps of 1/64
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".npy", ".jpg", ".jpeg")


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


def patch_labels(annotation: str | Path, store: str | Path | IpsStore, grid: str) -> PatchLabels:
    """Map the annotation file onto `grid` of `store` (a path, or a store already open); ManifestError
    naming the file when it is unusable."""
    path = Path(annotation)
    if not path.is_file():
        raise ManifestError(f"annotation {path} does not exist")
    opened = store if isinstance(store, IpsStore) else open_store(store)
    info = opened.grid(grid)
    coords = np.asarray(opened.coords(grid), dtype=np.int64)
    down = opened.level_downsample(info.level)
    lo = coords * down  # (N, dims) level-0 top-left corners
    size = np.asarray(info.patch_size, dtype=np.float64) * down  # level-0 footprint of one patch
    if path.suffix.lower() in (".geojson", ".json"):
        if opened.spatial_dims != 2:
            raise ManifestError(f"annotation {path}: GeoJSON polygons annotate 2D slides; give a mask for 3D")
        fractions = _polygon_fractions(_read_polygons(path), lo, size)
    elif path.suffix.lower() in MASK_SUFFIXES:
        level0 = tuple(int(s) for s in opened.level(0).shape[1:])
        fractions = _mask_fractions(_read_mask(path, opened.spatial_dims), level0, lo, size)
    else:
        raise ManifestError(
            f"annotation {path}: unknown kind {path.suffix!r}; use QuPath GeoJSON (.geojson) or "
            f"a mask ({', '.join(MASK_SUFFIXES)})"
        )
    keep = np.flatnonzero(fractions > 0)
    return PatchLabels(len(coords), keep.astype(np.int64), fractions[keep].astype(np.float32))


def _read_polygons(path: Path) -> list[list[np.ndarray]]:
    """Polygons as lists of rings `(k, 2)` in (row, col) level-0 pixels: the outer ring, then holes."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(f"annotation {path}: not valid JSON ({e})") from None
    geometries = []
    items = data.get("features", [data]) if isinstance(data, dict) else data
    for item in items if isinstance(items, list) else []:
        geometry = item.get("geometry", item) if isinstance(item, dict) else None
        if isinstance(geometry, dict):
            geometries.append(geometry)
    polygons: list[list[np.ndarray]] = []
    for g in geometries:
        kind, coords = g.get("type"), g.get("coordinates")
        parts = [coords] if kind == "Polygon" else coords if kind == "MultiPolygon" else []
        for rings in parts or []:
            # GeoJSON (and QuPath) write (x, y): the one place they become (row, col)
            polygons.append([np.asarray(ring, dtype=np.float64)[:, ::-1] for ring in rings])
    if not polygons:
        raise ManifestError(f"annotation {path}: no Polygon or MultiPolygon geometry found")
    return polygons


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


def _read_mask(path: Path, dims: int) -> np.ndarray:
    try:
        if path.suffix.lower() == ".npy":
            mask = np.load(path, allow_pickle=False)
        elif path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            mask = tifffile.imread(path)
        else:
            from PIL import Image

            mask = np.asarray(Image.open(path))
    except (OSError, ValueError) as e:
        raise ManifestError(f"annotation {path}: cannot read the mask ({e})") from None
    if mask.ndim == dims + 1:  # channels last (RGB PNG): any channel set counts
        mask = mask.max(axis=-1)
    if mask.ndim != dims:
        raise ManifestError(f"annotation {path}: mask has shape {mask.shape}, expected {dims} dimensions")
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
