"""Context reads: each grid cell's patch together with a zoomed-out view of its surroundings.

An object larger than a patch (a mark split over four cells, a lesion across a cell border) is shown
whole by no patch of the grid. `ContextSource` gives every cell a second view: the window of `factor`
patch sides centred on the cell, read from the same level of the store, padded outside the image with
the store's background, and area-averaged by `factor` down to the patch size. Both views travel as one
item, the context's channels after the patch's: `(2 C, *patch)`. Positions, coordinates and the grid are
the cell's own, so selection, heatmaps and predictions address the same patches as without context.

The window reads are bounded like the patch reads: at most `WINDOW_PIXELS` window pixels are held at a
time, whatever the number of patches asked for, so memory stays O(M + I) patches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ips.data.zarr_source import ZarrPatchSource

# the most window pixels (all channels) decoded at once; a larger read goes in several steps
WINDOW_PIXELS = 1 << 24


def context_views(factor: int) -> int:
    """Views per item for a context factor: 1 (the patch alone) for factor 1, else 2 (patch, context)."""
    if factor < 1:
        raise ValueError(f"data.context must be >= 1, got {factor}")
    return 1 if factor == 1 else 2


def area_downsample(windows: np.ndarray, factor: int) -> np.ndarray:
    """Average `windows` `(n, C, *S)` over blocks of `factor` pixels per spatial axis -> `(n, C, *S/factor)`.

    Integer pixels are rounded half up (`floor(mean + 0.5)`, exact: the block sums are whole numbers,
    uint8 ones in float32, wider ones in float64); float pixels keep the mean. Every spatial side must be
    a multiple of `factor`.
    """
    n, c, *spatial = windows.shape
    if any(s % factor for s in spatial):
        raise ValueError(f"window sides {tuple(spatial)} are not multiples of {factor}")
    pool = torch.nn.functional.avg_pool2d if len(spatial) == 2 else torch.nn.functional.avg_pool3d
    x = torch.from_numpy(np.ascontiguousarray(windows)).reshape(n * c, 1, *spatial)  # (n C, 1, *S)
    if np.issubdtype(windows.dtype, np.integer):
        count = factor ** len(spatial)
        wide = x.float() if windows.dtype == np.uint8 else x.double()
        sums = pool(wide, factor, divisor_override=1).to(torch.int64)  # exact block sums
        out = torch.div(sums + count // 2, count, rounding_mode="floor").numpy().astype(windows.dtype)
    else:
        out = pool(x.double(), factor).numpy().astype(windows.dtype)
    return out.reshape(n, c, *(s // factor for s in spatial))


class ContextSource:
    """A pixel source whose items are a cell's patch and its context view, channels stacked.

    Args:
        base: the grid's pixel source (`ips.data.zarr_source.ZarrPatchSource`).
        factor: the context window's side in patch sides (>= 2); the window is centred on the cell.

    `read(indices)` -> `(n, 2 C, *patch)`: channels `[:C]` the patch as `base.read` gives it, `[C:]` the
    window `[corner - (factor - 1) * patch // 2, ... + factor * patch)` of the grid's level, background
    outside the image, area-averaged by `factor`. Length, positions and `coords` are the base's.
    """

    def __init__(self, base: ZarrPatchSource, factor: int) -> None:
        if factor < 2:
            raise ValueError(f"a context source needs factor >= 2, got {factor}")
        self.base = base
        self.factor = factor
        channels, *patch = base.patch_shape
        self.patch_shape = (2 * channels, *patch)
        self.spatial_dims = base.spatial_dims
        self.coords = base.coords
        self._patch = np.asarray(patch, dtype=np.int64)
        self._window = tuple(int(s) * factor for s in patch)
        # per step: as many windows as fit WINDOW_PIXELS, at least one
        self._step = max(1, WINDOW_PIXELS // (channels * int(np.prod(self._window))))

    def __len__(self) -> int:
        return len(self.base)

    def positions(self) -> np.ndarray:
        return self.base.positions()

    def level0_coords(self) -> np.ndarray:
        return self.base.level0_coords()

    def window_corners(self, indices: np.ndarray) -> np.ndarray:
        """Top-left corners of the context windows of the cells at `indices`, int64 `(n, dims)`."""
        return self.coords[indices] - (self.factor - 1) * self._patch // 2

    def read_context(self, indices: np.ndarray) -> np.ndarray:
        """The context views of the cells at `indices` int `(n,)`: `(n, C, *patch)` in the store's dtype."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self.coords)
        if indices.size and (indices.min() < -n or indices.max() >= n):
            raise IndexError(f"patch index out of range for a grid of {n} patches")
        channels = self.patch_shape[0] // 2
        out = np.empty((len(indices), channels, *self._patch.tolist()), dtype=self.base.dtype)
        for start in range(0, len(indices), self._step):
            part = indices[start : start + self._step] % n
            windows = self.base.read_boxes(self.window_corners(part), self._window)  # (k, C, *window)
            out[start : start + len(part)] = area_downsample(windows, self.factor)
        return out

    def read(self, indices: np.ndarray) -> torch.Tensor:
        """Patches and context views at `indices` int `(n,)`, in that order: `(n, 2 C, *patch)`."""
        patches = self.base.read(indices)  # (n, C, *patch); checks the indices
        context = torch.from_numpy(self.read_context(indices))
        return torch.cat([patches, context], dim=1)
