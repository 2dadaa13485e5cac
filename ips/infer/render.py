"""Drawing per-patch scores at thumbnail resolution: never a full-resolution overlay in memory.

The base image comes from a low pyramid level of the store (the first level whose longest y/x side is at
most `max_size`; level 0 only when the whole slide is that small). Each patch's score is painted into an
array of the thumbnail's size with a 2D difference array (four corner updates per patch, then two
cumulative sums), so painting costs O(N + thumbnail pixels) time and memory, whatever the slide size;
where patches overlap (stride < patch size) a pixel shows the mean of the patches covering it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ips.data.store import IpsStore
from ips.infer.scale import CMAP, Scale, colour_table, ratio_text

# The overlay's colours: `ips.infer.scale` (shared with `ips view` and the GeoJSON).
PAINT_BLOCK = 1 << 16  # patches converted to pixel boxes at once
PROJECTION_SLAB = 16  # z-planes read at once when projecting a volume


def thumbnail_level(store: IpsStore, max_size: int = 1024) -> int:
    """The first pyramid level whose longest y/x side is <= `max_size` (else the smallest level)."""
    n_levels = len(store.level_downsamples) or 1
    for k in range(n_levels):
        if max(store.level(k).shape[-2:]) <= max_size:
            return k
    return n_levels - 1


def to_rgb(image: np.ndarray, background: float | None = None) -> np.ndarray:
    """`(C, Y, X)` of any dtype -> uint8 `(Y, X, 3)`: RGB as is for 3 uint8 channels, else the channel
    mean, contrast-stretched (0.5-99.5 percentiles) unless uint8."""
    img = image.astype(np.float32)
    if img.shape[0] != 3:
        img = img.mean(axis=0, keepdims=True)
    if image.dtype != np.uint8:
        lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
        img = (img - lo) / max(float(hi - lo), 1e-6) * 255.0
    img = np.clip(img, 0, 255).astype(np.uint8)
    if img.shape[0] == 1:
        img = np.repeat(img, 3, axis=0)
    return np.ascontiguousarray(img.transpose(1, 2, 0))


def read_thumbnail(store: IpsStore, max_size: int = 1024) -> tuple[np.ndarray, int]:
    """The base image: `((Y', X', 3) uint8, level)`; 3D volumes are projected along z (maximum, or
    minimum where the background is bright)."""
    level = thumbnail_level(store, max_size)
    array = store.level(level)
    if array.ndim == 3:
        return to_rgb(np.asarray(array[...])), level  # (C, Y', X'): a small level
    # (C, Z', Y', X'): project slab by slab, so a long z axis never sits in memory at once
    bright = float(store.background or 0) > 0
    out: np.ndarray | None = None
    for z0 in range(0, array.shape[1], PROJECTION_SLAB):
        slab = np.asarray(array[:, z0 : z0 + PROJECTION_SLAB])
        part = slab.min(axis=1) if bright else slab.max(axis=1)
        out = part if out is None else (np.minimum(out, part) if bright else np.maximum(out, part))
    assert out is not None
    return to_rgb(out), level


def overlay_colors(n: int = 256) -> np.ndarray:
    """The overlay colour map as a table: float `(n, 4)` RGBA in [0, 1] (`ips.infer.scale.colour_table`)."""
    return colour_table(n)


def overlay_cmap() -> object:
    """`overlay_colors` as a matplotlib colormap (masked: transparent)."""
    from matplotlib.colors import ListedColormap

    return ListedColormap(overlay_colors(), name=f"{CMAP}_ramp").with_extremes(bad=(0.0, 0.0, 0.0, 0.0))


def pixel_boxes(
    level0_corner: np.ndarray, size0: np.ndarray, downsample: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """Level-0 rectangles -> integer pixel boxes of an image `shape` at `downsample`.

    Args:
        level0_corner: `(N, 2)` top-left `(row, col)` in level-0 pixels; size0 `(2,)` patch size there.
        downsample: `(2,)` level-0 pixels per image pixel; shape: the image's `(rows, cols)`.
    Returns:
        int64 `(N, 4)` `(r0, c0, r1, c1)`, clipped to the image, each at least one pixel wide (tiny
        patches stay visible; adjacent patches stay edge to edge because both ends are rounded alike).
    """
    lo = np.rint(np.asarray(level0_corner, dtype=np.float64) / downsample).astype(np.int64)  # (N, 2)
    hi = np.rint((np.asarray(level0_corner, dtype=np.float64) + size0) / downsample).astype(np.int64)
    hi = np.maximum(hi, lo + 1)
    limit = np.asarray(shape, dtype=np.int64)
    lo, hi = np.clip(lo, 0, limit), np.clip(hi, 0, limit)
    return np.concatenate([lo, hi], axis=1)


def paint(values: np.ndarray, boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Mean of `values (N,)` over the patches covering each pixel of `shape`; NaN where none does.

    `boxes`: int `(N, 4)` `(r0, c0, r1, c1)` as from `pixel_boxes`. Memory: two arrays of `shape`.
    """
    return paint_blocks([(values, boxes)], shape)


def paint_patches(
    values: np.ndarray,
    level0_corner: np.ndarray,
    size0: np.ndarray,
    downsample: np.ndarray,
    shape: tuple[int, int],
) -> np.ndarray:
    """`paint` of patches given by level-0 corners `(N, 2)`, converted to pixel boxes block by block (the
    temporaries are O(block), not O(N))."""
    blocks = (
        (
            values[i : i + PAINT_BLOCK],
            pixel_boxes(level0_corner[i : i + PAINT_BLOCK], size0, downsample, shape),
        )
        for i in range(0, len(values), PAINT_BLOCK)
    )
    return paint_blocks(blocks, shape)


def paint_blocks(blocks: Iterable[tuple[np.ndarray, np.ndarray]], shape: tuple[int, int]) -> np.ndarray:
    """`paint` over blocks of `(values (n,), boxes (n, 4))`: corner updates of a 2D difference array per
    block, then two cumulative sums."""
    h, w = shape
    total = np.zeros((h + 1, w + 1), dtype=np.float64)
    count = np.zeros((h + 1, w + 1), dtype=np.float64)
    for values, boxes in blocks:
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        r0, c0, r1, c1 = boxes[keep].T
        v = np.asarray(values, dtype=np.float64)[keep]
        for rows, cols, sign in ((r0, c0, 1.0), (r0, c1, -1.0), (r1, c0, -1.0), (r1, c1, 1.0)):
            np.add.at(total, (rows, cols), sign * v)
            np.add.at(count, (rows, cols), sign)
    total = total.cumsum(0).cumsum(1)[:h, :w]
    count = np.rint(count.cumsum(0).cumsum(1)[:h, :w])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def max_over_axis(coords: np.ndarray, values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Collapse patches that differ only along `axis` (a 3D grid seen from above): `(coords (n, d-1),
    max of values (n,))` per distinct remaining coordinate."""
    rest = np.delete(np.asarray(coords), axis, axis=1)
    keys, inverse = np.unique(rest, axis=0, return_inverse=True)
    out = np.full(len(keys), -np.inf)
    np.maximum.at(out, inverse.reshape(-1), np.asarray(values, dtype=np.float64))
    return keys, out


def save_overlay(
    path: str | Path,
    base: np.ndarray,
    heats: Sequence[np.ndarray],
    titles: Sequence[str],
    *,
    suptitle: str,
    colorbar_label: str,
    scales: Sequence[Scale],
    aspect: float = 1.0,
    marks: Sequence[tuple[float, float]] | None = None,
) -> Path:
    """A panel of overlays (one per heat map) with a colour bar each; written atomically.

    `base`: `(Y, X, 3)` uint8; each heat: `(Y, X)` log2 ratios to uniform (`ips.infer.scale.log_ratio`),
    NaN where nothing is painted (the base shows); `scales`: one colour scale per heat (at or below its
    threshold: transparent). `aspect`: physical height / width of a pixel. `marks`: `(row, col)` points
    to circle.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = base.shape[:2]
    n = len(heats)
    panel_w = 6.0
    panel_h = max(2.0, min(12.0, panel_w * h * aspect / max(w, 1)))
    fig, axes = plt.subplots(1, n, figsize=(panel_w * n + 1.2 * n, panel_h + 0.8), squeeze=False)
    for ax, heat, title, scale in zip(axes[0], heats, titles, scales):
        ax.imshow(base, aspect=aspect, interpolation="nearest")
        shown = np.ma.masked_where(np.isnan(scale.position(heat)), heat)  # at or below the threshold: none
        im = ax.imshow(
            shown,
            cmap=overlay_cmap(),
            vmin=scale.threshold,
            vmax=scale.top,
            aspect=aspect,
            interpolation="nearest",
        )
        for r, c in marks or ():
            ax.plot([c], [r], marker="o", markersize=12, markerfacecolor="none", markeredgecolor="cyan")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        step = max(1.0, np.ceil((scale.top - scale.threshold) / 6))
        ticks = np.unique(
            np.r_[scale.threshold, np.arange(np.ceil(scale.threshold), scale.top, step), scale.top]
        )
        bar.set_ticks(ticks)
        bar.set_ticklabels([ratio_text(t) for t in ticks], fontsize=7)
        bar.set_label(colorbar_label, fontsize=8)
    fig.suptitle(suptitle, fontsize=10)
    return _save(fig, path)


def save_gallery(
    path: str | Path, images: Sequence[np.ndarray], captions: Sequence[str], *, title: str, columns: int = 8
) -> Path:
    """A grid of `(Y, X, 3)` uint8 images with a caption each; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(images))
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.1 * rows + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, caption in zip(axes.ravel(), images, captions):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _save(fig: object, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.tight_layout()  # type: ignore[attr-defined]
    fig.savefig(tmp, dpi=100)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    tmp.replace(path)
    return path
