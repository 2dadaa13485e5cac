"""Tissue / foreground masks on a low-resolution level.

2D RGB (brightfield): Otsu on HSV saturation (glass is grey-white, stain is coloured), median-smoothed;
the threshold is clipped to [0.05, 0.15] so a blank slide does not turn sensor noise into tissue and a
slide that is all tissue is not split in two. Other images (grey, fluorescence, volumes): Otsu on the
channel mean, foreground on the side away from the background value. Then holes smaller than
`max_hole_um2` are filled and objects smaller than `min_object_um2` removed (areas in micrometers
squared, capped at 1% of the image so small crops keep their tissue; where the source has no spacing a
level-0 pixel is taken as 0.5 um, a 20x scan).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

SATURATION_CLIP = (0.05, 0.15)
ASSUMED_UM_PER_PX = 0.5


def _otsu(values: np.ndarray, band: int = 64) -> float:
    """Otsu's threshold from a 256-bin histogram (bincount: ~10x faster than np.histogram on floats),
    counted in bands of `band` rows (no float copy of the whole image)."""
    if values.size == 0:
        return 0.0
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return hi
    rows = values.reshape(values.shape[0], -1) if values.ndim > 1 else values.reshape(1, -1)
    hist = np.zeros(256, dtype=np.int64)
    for y in range(0, rows.shape[0], band):
        q = rows[y : y + band] - lo
        q *= 255.0 / (hi - lo)
        hist += np.bincount(q.astype(np.uint8).ravel(), minlength=256)
    centres = lo + (np.arange(256) + 0.5) * (hi - lo) / 256
    return float(threshold_otsu(hist=(hist, centres)))


def _saturation(image: np.ndarray, band: int = 64) -> np.ndarray:
    """HSV saturation `(max - min) / max` (0 where max is 0) of a uint8 RGB image `(3, Y, X)`, float32
    `(Y, X)`, computed in bands of `band` rows: a float copy of the whole level, and its temporaries,
    would be many times the image (the mask level of a large slide is up to 2048 px square)."""
    out = np.empty(image.shape[1:], dtype=np.float32)
    for y in range(0, image.shape[1], band):
        rgb = image[:, y : y + band].astype(np.float32)
        hi, lo = rgb.max(axis=0), rgb.min(axis=0)
        out[y : y + band] = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1), 0)
    return out


def _median3(image: np.ndarray, band: int = 64) -> np.ndarray:
    """`ndi.median_filter(image, size=3)` of a 2D image, in place, in bands of `band` rows (each read
    with the row above and below it as they were): the same values, one band of extra memory instead of
    a second whole image."""
    above = None  # the original row just above the current band
    for y in range(0, image.shape[0], band):
        lo, hi = max(0, y - 1), min(image.shape[0], y + band + 1)
        block = image[lo:hi].copy()
        if above is not None:
            block[0] = above
        above = image[min(y + band, image.shape[0]) - 1].copy()
        filtered = ndi.median_filter(block, size=3)
        image[y : y + band] = filtered[y - lo : y - lo + min(band, image.shape[0] - y)]
    return image


def _fill_small(mask: np.ndarray, max_size: int, *, holes: bool, band: int = 256) -> None:
    """In place: holes (`holes=True`: components of the background) or objects of at most `max_size`
    pixels, face-connected, flipped: `skimage.morphology.remove_small_holes` / `remove_small_objects`
    with `max_size`, without their whole-image bool temporaries and index arrays (one int32 label
    image, then bands of `band` rows)."""
    labels = np.empty(mask.shape, dtype=np.int32)
    n = ndi.label(~mask if holes else mask, ndi.generate_binary_structure(mask.ndim, 1), output=labels)
    sizes = np.zeros(n + 1, dtype=np.int64)
    for y in range(0, mask.shape[0], band):  # bincount casts to int64: a band at a time
        sizes += np.bincount(labels[y : y + band].ravel(), minlength=n + 1)
    small = sizes <= max_size
    small[0] = False  # label 0: the other side
    for y in range(0, mask.shape[0], band):
        rows = mask[y : y + band]  # a view: written in place
        flip = small[labels[y : y + band]]
        if holes:
            rows |= flip
        else:
            rows &= ~flip


def _um_per_px(spacing: tuple[float, ...] | None, downsample: tuple[int, ...]) -> list[float]:
    base = spacing or tuple([ASSUMED_UM_PER_PX] * len(downsample))
    return [s * f for s, f in zip(base, downsample)]


def tissue_mask(
    image: np.ndarray,
    *,
    background: float,
    spacing: tuple[float, ...] | None,
    downsample: tuple[int, ...],
    min_object_um2: float = 2500.0,
    max_hole_um2: float = 2500.0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Foreground mask of a low-resolution level.

    Args:
        image: `(C, Y, X)` or `(C, Z, Y, X)` pixels of the level.
        background: the value of empty glass / empty space.
        spacing: level-0 micrometers per pixel (None: unknown).
        downsample: the level's factors relative to level 0, one per spatial axis.
    Returns:
        `(mask, info)`: bool `image.shape[1:]`, and `{"method", "threshold"}` for the store attributes.
    """
    spatial = image.shape[1:]
    if image.ndim == 3 and image.shape[0] == 3 and image.dtype == np.uint8:
        sat = _median3(_saturation(image))  # (Y, X) float32
        threshold = float(np.clip(_otsu(sat), *SATURATION_CLIP))
        mask, method = sat > threshold, "otsu-saturation"
        del sat  # before the hole filling's label image
    else:
        value = image.astype(np.float32).mean(axis=0)  # (*spatial)
        threshold = _otsu(value)
        lo, hi = float(value.min()), float(value.max())
        bright_background = background >= (lo + hi) / 2
        mask = value < threshold if bright_background else value > threshold
        method = "otsu-intensity"
    um = _um_per_px(spacing, downsample)
    pixel_area = float(np.prod(um[-len(spatial) :]))  # um^2 (2D) or um^3 (3D, then cubes of the side)
    if len(spatial) == 3:
        pixel_area = float(np.prod(um)) ** (2 / 3)  # compare a voxel's face area with the um^2 limits
    # never more than 1% of the image: a small crop of tissue must not vanish as a "small object"
    cap = max(1, mask.size // 100)
    min_obj = max(1, min(cap, int(round(min_object_um2 / pixel_area))))
    max_hole = max(1, min(cap, int(round(max_hole_um2 / pixel_area))))
    if mask.any():
        _fill_small(mask, max_hole, holes=True)
        _fill_small(mask, min_obj, holes=False)
    return mask, {"method": method, "threshold": threshold}


def resample_mask(mask: np.ndarray, spatial_shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
    """A user-given mask as stored: `(mask, downsample)` with integer factors relative to level 0.

    `mask` may be at any resolution whose size along each axis is `ceil(n / f)` or `n // f` for an
    integer factor `f` (f = 1: full resolution).
    """
    mask = np.asarray(mask)
    if mask.ndim != len(spatial_shape):
        raise ValueError(
            f"mask must have {len(spatial_shape)} dims like the image {spatial_shape}, got shape {mask.shape}"
        )
    factors = []
    for n, m in zip(spatial_shape, mask.shape):
        f = max(1, round(n / max(m, 1)))
        if m < 1 or not (-(-n // f) == m or n // f == m):
            raise ValueError(
                f"mask shape {mask.shape} is not the image {spatial_shape} downsampled by integer factors"
            )
        factors.append(f)
    return mask.astype(bool), tuple(factors)
