"""Patch grids: regular positions over a pyramid level, kept where the tissue fraction is high enough.

Edge policy: only patches that lie wholly inside the level are kept (no padding), so every grid patch
is a plain in-bounds read; the last `< patch` pixels of a row/column of the image are never covered.
The tissue fraction of a patch is the exact area share of mask pixels inside its footprint, from a
summed-area table interpolated at the (fractional) footprint corners.
"""

from __future__ import annotations

import numpy as np


def grid_starts(size: int, patch: int, stride: int) -> np.ndarray:
    """Top-left positions along one axis of patches wholly inside `[0, size)`: int64 `(n,)`."""
    if size < patch:
        return np.zeros(0, np.int64)
    return np.arange(0, size - patch + 1, stride, dtype=np.int64)


def _interp_axis(table: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of `table` along `axis` at fractional `coords` (already clipped)."""
    i0 = np.floor(coords).astype(np.int64)
    i0 = np.clip(i0, 0, table.shape[axis] - 2) if table.shape[axis] > 1 else np.zeros_like(i0)
    t = coords - i0
    a = np.take(table, i0, axis=axis)
    if table.shape[axis] == 1:
        return a
    b = np.take(table, i0 + 1, axis=axis)
    shape = [1] * table.ndim
    shape[axis] = -1
    t = t.reshape(shape)
    return a * (1 - t) + b * t


def tissue_fractions(
    mask: np.ndarray, starts: list[np.ndarray], extent: tuple[float, ...], scale: tuple[float, ...]
) -> np.ndarray:
    """Tissue fraction of every patch of a separable grid.

    Args:
        mask: bool `(*M)` (2 or 3 dims).
        starts: per axis, patch starts in the grid level's pixels, int64 `(n_a,)`.
        extent: patch size per axis in the grid level's pixels.
        scale: grid-level pixels -> mask pixels factor per axis (`level_downsample / mask_downsample`).
    Returns:
        float32 `(n_0, n_1[, n_2])`: share of each patch's area covered by mask pixels.
    """
    # summed-area table F with a zero border: F[i, j] = mask[:i, :j].sum(); the integral of a
    # piecewise-constant mask is multilinear inside each cell, so interpolating F is exact
    sat = mask.astype(np.float64)
    for ax in range(mask.ndim):
        sat = np.cumsum(sat, axis=ax)
        sat = np.concatenate([np.zeros_like(np.take(sat, [0], axis=ax)), sat], axis=ax)
    lo = [np.clip(s * f, 0, n) for s, f, n in zip(starts, scale, mask.shape)]
    hi = [np.clip((s + e) * f, 0, n) for s, e, f, n in zip(starts, extent, scale, mask.shape)]
    total = 0.0
    # inclusion-exclusion over the 2**dims corners of each footprint
    for corner in np.ndindex(*([2] * mask.ndim)):
        vals = sat
        for ax, c in enumerate(corner):
            vals = _interp_axis(vals, hi[ax] if c else lo[ax], ax)
        sign = (-1) ** (mask.ndim - sum(corner))
        total = total + sign * vals
    area = np.prod([e * f for e, f in zip(extent, scale)])
    return np.clip(total / area, 0.0, 1.0).astype(np.float32)


def make_grid(
    mask: np.ndarray,
    mask_downsample: tuple[int, ...],
    level_shape: tuple[int, ...],
    level_downsample: tuple[int, ...],
    patch: tuple[int, ...],
    stride: tuple[int, ...],
    min_tissue: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Patches of one grid.

    Args:
        mask: bool `(*M)` tissue mask; mask pixel i covers level-0 pixels `[i*f, (i+1)*f)` per axis.
        mask_downsample: the mask's factors relative to level 0.
        level_shape: spatial shape of the grid's level; level_downsample: its factors to level 0.
        patch, stride: per axis, in the level's pixels.
        min_tissue: keep patches whose tissue fraction is >= this.
    Returns:
        `coords` int64 `(N, dims)` top-left corners in the level's pixels, row-major order, and
        `tissue` float32 `(N,)`.
    """
    starts = [grid_starts(n, p, s) for n, p, s in zip(level_shape, patch, stride)]
    dims = len(level_shape)
    if any(len(s) == 0 for s in starts):
        return np.zeros((0, dims), np.int64), np.zeros(0, np.float32)
    scale = tuple(ld / md for ld, md in zip(level_downsample, mask_downsample))
    frac = tissue_fractions(mask, starts, tuple(float(p) for p in patch), scale)  # (n_0, ..., n_d)
    keep = frac >= min_tissue
    idx = np.nonzero(keep)  # row-major order
    coords = np.stack([starts[a][i] for a, i in enumerate(idx)], axis=1).astype(np.int64)
    return coords, frac[idx].astype(np.float32)
