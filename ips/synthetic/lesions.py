"""Synthetic slides (2D, H&E-like RGB) and volumes (3D, grey) with planted lesions and their truth.

2D (`render_slide_2d`): a white glass background with an irregular tissue region (45-75% of the area).
Tissue is rendered in optical density with the Ruifrok-Johnston H&E stain vectors: blotchy eosin (pink
stroma) plus small hematoxylin nuclei (semi-axes 1.5-3 px, ~4 per 32 x 32 tissue patch). A lesion is a
disc (radius 0.75-1.5 patch sizes, wholly inside tissue) packed with large (3.5-6 px), dark nuclei and
slightly paler stroma: visible at patch level. Per-slide stain strength (x0.8-1.2 hematoxylin,
x0.8-1.2 eosin) and nuclear density (x0.5-1.5) vary more than a lesion shifts the slide's mean colour,
so global colour statistics alone do not tell positives from negatives.

3D (`render_volume_3d`): a dark (0) background around an ellipsoidal body of smooth grey texture with a
few small bright specks; a lesion is a sphere (radius 0.3-0.5 patch sizes) of bright speckled voxels.
Per-volume brightness varies x0.8-1.2.

Truth: the lesion pixel mask is exactly the union of the discs/spheres (pixel centres within `radius`
of `center`); the store's truth is, per grid patch, the share of its pixels in a lesion (`grid_share`). A patch
"overlaps a lesion" when its fraction is > 0. Positive slides have 1-3 lesions, negatives none.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ips.config import TaskConfig
from ips.synthetic._store import stratified_splits, write_manifest, write_store

# Ruifrok & Johnston (2001) optical density per unit stain, RGB
HEMATOXYLIN = np.array([0.650, 0.704, 0.286], dtype=np.float32)
EOSIN = np.array([0.072, 0.990, 0.105], dtype=np.float32)


@dataclass(frozen=True)
class Lesion:
    """A planted lesion: centre `(row, col)` or `(z, row, col)` in level-0 pixels, radius in pixels."""

    center: tuple[int, ...]
    radius: float

    def to_dict(self) -> dict[str, object]:
        return {"center": list(self.center), "radius": self.radius}


@dataclass(frozen=True)
class LesionSlide:
    """A rendered slide or volume with its truth.

    `image`: `(3, H, W)` uint8 (2D) or `(1, Z, Y, X)` uint8 (3D); `tissue` and `lesion_mask`: bool of the
    spatial shape; `label`: 1 when there is at least one lesion.
    """

    image: np.ndarray
    tissue: np.ndarray
    lesion_mask: np.ndarray
    lesions: tuple[Lesion, ...]

    @property
    def label(self) -> int:
        return int(len(self.lesions) > 0)


def lesion_tasks() -> tuple[TaskConfig, ...]:
    """The single binary task of the lesion datasets (manifest column `label`)."""
    return (TaskConfig(name="lesion", kind="binary", num_classes=2, label_column="label"),)


def lesion_pixel_mask(shape: Sequence[int], lesions: Sequence[Lesion]) -> np.ndarray:
    """Bool mask of `shape` `(H, W)` or `(Z, Y, X)`: pixels whose centre lies within a lesion's radius."""
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    mask = np.zeros(tuple(shape), dtype=bool)
    for les in lesions:
        d2 = sum((g - c) ** 2 for g, c in zip(grids, les.center))
        mask |= d2 <= les.radius**2
    return mask


# --- shared helpers -------------------------------------------------------------------------------------


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Zero-mean, unit-std smooth noise of `shape`, with about `cells` blobs along each axis (float32)."""
    low = ndimage.gaussian_filter(rng.standard_normal((cells * 3,) * len(shape)), sigma=1.5, mode="wrap")
    up = ndimage.zoom(low, [s / (cells * 3) for s in shape], order=1, grid_mode=True, mode="grid-wrap")
    up = up[tuple(slice(0, s) for s in shape)]
    return ((up - up.mean()) / (up.std() + 1e-8)).astype(np.float32)


def _place_lesions(
    rng: np.random.Generator, region: np.ndarray, n: int, radii: np.ndarray, min_radius: float
) -> tuple[Lesion, ...]:
    """Up to `n` lesions with centres in `region` (bool), wholly inside it and not touching each other.

    A radius that does not fit anywhere is shrunk to the largest that does, down to `min_radius`.
    """
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[tuple(slice(1, -1) for _ in region.shape)]
    lesions: list[Lesion] = []
    for radius in radii[:n]:
        radius = min(float(radius), float(dist.max()) - 1.0)
        if radius < min_radius:
            break
        ok = np.argwhere(dist >= radius + 1)
        for _ in range(50):
            c = tuple(int(v) for v in ok[rng.integers(len(ok))])
            if all(np.linalg.norm(np.subtract(c, o.center)) > radius + o.radius + 2 for o in lesions):
                lesions.append(Lesion(center=c, radius=radius))
                break
    return tuple(lesions)


def _stamp(canvas: np.ndarray, kernel: np.ndarray, center: Sequence[int], value: float) -> None:
    """`canvas = max(canvas, value * kernel)` with `kernel` centred at `center`, clipped at the borders."""
    half = [k // 2 for k in kernel.shape]
    dst, src = [], []
    for c, h, k, s in zip(center, half, kernel.shape, canvas.shape):
        lo, hi = c - h, c - h + k
        dst.append(slice(max(lo, 0), min(hi, s)))
        src.append(slice(max(lo, 0) - lo, k - (hi - min(hi, s))))
    view = canvas[tuple(dst)]
    np.maximum(view, value * kernel[tuple(src)], out=view)


def _blob_kernel(rng: np.random.Generator, semi_axes: Sequence[float]) -> np.ndarray:
    """A randomly rotated ellipse/ellipsoid with a flat top and a soft edge, values in [0, 1]."""
    dims = len(semi_axes)
    r = int(np.ceil(max(semi_axes))) + 1
    pts = np.stack(np.meshgrid(*[np.arange(-r, r + 1)] * dims, indexing="ij"), axis=-1).astype(np.float32)
    rot, _ = np.linalg.qr(rng.standard_normal((dims, dims)))
    rho2 = (((pts @ rot) / np.asarray(semi_axes, dtype=np.float32)) ** 2).sum(-1)
    return np.clip((1.0 - rho2) * 3.0, 0.0, 1.0).astype(np.float32)


def _sprinkle(
    rng: np.random.Generator,
    canvas: np.ndarray,
    where: np.ndarray,
    density: float,
    radius_range: tuple[float, float],
    value_range: tuple[float, float],
    elongation: tuple[float, float] = (0.6, 1.0),
    n_shapes: int = 32,
) -> None:
    """Stamp blobs at Poisson(`density` * |where|) uniform positions of `where` into `canvas` (max).

    Shapes come from a bank of `n_shapes` random ellipses (building one per blob is the slow part).
    """
    pos = np.argwhere(where)
    n = int(rng.poisson(density * len(pos))) if len(pos) else 0
    if n == 0:
        return
    bank = []
    for _ in range(n_shapes):
        a = rng.uniform(*radius_range)
        bank.append(_blob_kernel(rng, [a] + [a * rng.uniform(*elongation) for _ in range(canvas.ndim - 1)]))
    centers = pos[rng.integers(0, len(pos), n)]
    shapes = rng.integers(0, n_shapes, n)
    values = rng.uniform(*value_range, n)
    for c, k, v in zip(centers, shapes, values):
        _stamp(canvas, bank[k], c, v)


def _n_lesions(rng: np.random.Generator, positive: bool) -> int:
    return int(rng.integers(1, 4)) if positive else 0


# --- 2D -------------------------------------------------------------------------------------------------


def render_slide_2d(
    rng: np.random.Generator,
    size: int | tuple[int, int],
    patch_size: int,
    *,
    positive: bool,
    n_lesions: int | None = None,
) -> LesionSlide:
    """One H&E-like slide `(3, H, W)` uint8; `positive` plants 1-3 lesions (or `n_lesions`)."""
    h, w = (size, size) if isinstance(size, int) else size
    if min(h, w) < 2 * patch_size:
        raise ValueError(f"slide {h}x{w} is too small for patch size {patch_size}")
    h_scale, e_scale = rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2)
    nuc_density = 0.004 * rng.uniform(0.5, 1.5)  # nucleus centres per tissue pixel
    tissue_fraction = rng.uniform(0.45, 0.75)

    # tissue: smooth blobs pulled towards the middle, thresholded so that glass remains at the edges
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    field = _smooth_field(rng, (h, w), 4) - 1.5 * (yy**2 + xx**2)
    tissue = field > np.quantile(field, 1.0 - tissue_fraction)

    n = n_lesions if n_lesions is not None else _n_lesions(rng, positive)
    radii = rng.uniform(0.75, 1.5, 3 if n_lesions is None else max(n, 0)) * patch_size
    lesions = _place_lesions(rng, tissue, n, radii, 0.5 * patch_size) if n else ()
    if n and not lesions:
        raise ValueError(f"no room for a lesion in a {h}x{w} slide; use a larger size")
    lesion = lesion_pixel_mask((h, w), lesions)

    fine = rng.standard_normal((h, w)).astype(np.float32)
    eosin = e_scale * (0.38 + 0.08 * _smooth_field(rng, (h, w), 24) + 0.03 * fine)
    eosin *= np.where(lesion, 0.8, 1.0).astype(np.float32)  # cell-rich: less stroma
    nuclei = np.zeros((h, w), dtype=np.float32)
    _sprinkle(rng, nuclei, tissue, nuc_density, (1.5, 3.0), (0.7, 1.1))
    _sprinkle(rng, nuclei, lesion, 0.012, (3.5, 6.0), (1.1, 1.5), (0.7, 1.0))
    hema = h_scale * (0.06 + nuclei * (1.0 + 0.12 * fine))
    od = tissue[..., None] * (hema[..., None] * HEMATOXYLIN + np.maximum(eosin, 0)[..., None] * EOSIN)
    od += 0.025 + 0.006 * rng.standard_normal((h, w, 1)).astype(np.float32)  # glass
    rgb = np.clip(255.0 * np.exp(-np.maximum(od, 0)), 0, 255).round().astype(np.uint8)
    return LesionSlide(np.ascontiguousarray(rgb.transpose(2, 0, 1)), tissue, lesion, lesions)


# --- 3D -------------------------------------------------------------------------------------------------


def render_volume_3d(
    rng: np.random.Generator,
    size: int | tuple[int, int, int],
    patch_size: int,
    *,
    positive: bool,
    n_lesions: int | None = None,
) -> LesionSlide:
    """One grey volume `(1, Z, Y, X)` uint8 (background 0); `positive` plants 1-3 bright spheres."""
    shape = (size,) * 3 if isinstance(size, int) else tuple(size)
    if min(shape) < 2 * patch_size:
        raise ValueError(f"volume {shape} is too small for patch size {patch_size}")
    gain = rng.uniform(0.8, 1.2)
    axes = [np.linspace(-1, 1, s) for s in shape]
    semi = rng.uniform(0.75, 0.95, 3)
    centre = rng.uniform(-0.05, 0.05, 3)
    grids = np.meshgrid(*axes, indexing="ij")
    body = sum(((g - c) / a) ** 2 for g, c, a in zip(grids, centre, semi)) <= 1.0

    n = n_lesions if n_lesions is not None else _n_lesions(rng, positive)
    radii = rng.uniform(0.3, 0.5, 3 if n_lesions is None else max(n, 0)) * patch_size
    lesions = _place_lesions(rng, body, n, radii, 0.25 * patch_size) if n else ()
    if n and not lesions:
        raise ValueError(f"no room for a lesion in a {shape} volume; use a larger size")
    lesion = lesion_pixel_mask(shape, lesions)

    fine = rng.standard_normal(shape).astype(np.float32)
    tissue = 90.0 + 18.0 * _smooth_field(rng, shape, 3) + 6.0 * fine
    specks = np.zeros(shape, dtype=np.float32)
    _sprinkle(rng, specks, body, 2e-4, (1.0, 2.0), (40.0, 70.0))  # small bright normal structures
    vol = tissue + specks
    vol = np.where(lesion, 175.0 + 35.0 * fine, vol)  # bright and speckled
    vol = np.where(body, np.clip(gain * vol, 1, 255), 0).round().astype(np.uint8)
    return LesionSlide(vol[None], body, lesion, lesions)


def render_lesion_slide(
    rng: np.random.Generator, size: int, patch_size: int, *, positive: bool, spatial_dims: int = 2
) -> LesionSlide:
    """`render_slide_2d` or `render_volume_3d` by `spatial_dims`."""
    if spatial_dims == 2:
        return render_slide_2d(rng, size, patch_size, positive=positive)
    if spatial_dims == 3:
        return render_volume_3d(rng, size, patch_size, positive=positive)
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


def slide_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of slide `index`: independent of how many slides are made."""
    return np.random.default_rng([seed, 0x4C45, index])


def slide_labels(n_slides: int, positive_fraction: float, seed: int) -> np.ndarray:
    """`(n_slides,)` int64 0/1: `round(n * positive_fraction)` positives at seeded random indices."""
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    labels = np.zeros(n_slides, dtype=np.int64)
    labels[: int(round(n_slides * positive_fraction))] = 1
    return np.random.default_rng([seed, 0x4C41]).permutation(labels)


def _coarse(mask: np.ndarray, factor: int) -> np.ndarray:
    """Every `factor`-th pixel (block centres) of a mask: shape `n // factor` or `ceil(n / factor)`."""
    return mask[tuple(slice(factor // 2, None, factor) for _ in mask.shape)]


def make_lesion_dataset(
    out_dir: str | Path,
    n_slides: int,
    size: int,
    patch_size: int,
    seed: int,
    positive_fraction: float = 0.5,
    spatial_dims: int = 2,
    *,
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    spacing: tuple[float, ...] | None = None,
    detect_tissue: bool = False,
    min_tissue: float = 0.25,
) -> Path:
    """Write `n_slides` lesion slides (2D) or volumes (3D) as stores under `out_dir/stores/` + a manifest.

    Stores: grid `default` of `patch_size` patches at stride `patch_size`; tissue = the rendered tissue
    (or body) mask unless `detect_tissue` (then the writer's own detection); patches with less than
    `min_tissue` tissue are dropped. Spacing default: 0.5 um/px (2D, a 20x scan) or 1 um voxels (3D).
    Truth: `ips_truth/lesion` `(N,)` = share of each grid patch inside a lesion (> 0: overlaps one),
    attributes `{"label", "lesions": [{"center", "radius"}], "patch_size"}`. Manifest
    `out_dir/manifest.csv`: `slide_id,path,label,split,n_lesions` (splits stratified by label).
    Returns the manifest's path.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    out_dir = Path(out_dir)
    labels = slide_labels(n_slides, positive_fraction, seed)
    splits = stratified_splits(labels.tolist(), split_fractions, seed)
    if spacing is None:
        spacing = (0.5, 0.5) if spatial_dims == 2 else (1.0, 1.0, 1.0)
    background = 255 if spatial_dims == 2 else 0
    rows = []
    for i, label in enumerate(labels):
        slide = render_lesion_slide(
            slide_rng(seed, i), size, patch_size, positive=bool(label), spatial_dims=spatial_dims
        )
        slide_id = f"lesion{spatial_dims}d_{i:04d}"
        store = write_store(
            slide.image,
            out_dir / "stores",
            slide_id,
            patch_size=patch_size,
            background=background,
            mask=None if detect_tissue else _coarse(slide.tissue, max(1, patch_size // 8)),
            min_tissue=min_tissue,
            spacing=tuple(spacing),
            truth_masks={"lesion": slide.lesion_mask},
            truth_attrs={
                "label": slide.label,
                "lesions": [les.to_dict() for les in slide.lesions],
                "patch_size": patch_size,
            },
        )
        rows.append(
            {
                "slide_id": slide_id,
                "path": store.relative_to(out_dir).as_posix(),
                "label": slide.label,
                "split": splits[i],
                "n_lesions": len(slide.lesions),
            }
        )
    params = {
        "n_slides": n_slides,
        "size": size,
        "patch_size": patch_size,
        "seed": seed,
        "positive_fraction": positive_fraction,
        "spatial_dims": spatial_dims,
        "split_fractions": list(split_fractions),
        "spacing": list(spacing),
        "detect_tissue": detect_tissue,
        "min_tissue": min_tissue,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "lesions.json").write_text(json.dumps(params, indent=1))
    return write_manifest(out_dir / "manifest.csv", rows, ["slide_id", "path", "label", "split", "n_lesions"])
