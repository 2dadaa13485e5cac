"""Coarse views of a patch source: the same N patches, same indices and positions, at lower resolution.

The selection cascade (`ips.algo.cascade`) scores every patch of a slide on such a view, so the view
must be cheap to read:

- `PyramidView`: each patch's box at a coarser pyramid level of the same store (factor f per axis:
  `log2 f` levels up), read through the same checked chunk reader as the patches: 1/f^d of the pixels.
  A grid whose corners are multiples of f maps onto the coarse level exactly; otherwise a corner is
  rounded down (less than one coarse pixel off).
- `PooledView`: any pixel source: the patches read at full resolution, then mean-pooled by f (in-memory
  sources, stores without that level). It saves the model's work, not the reads.

`coarse_view(source, factor)` picks the pyramid where the store has the level, else pooling. Each
view's `scale` says how many of its patches take the memory of one read at full resolution (a pyramid
view: f^d; a pooled view reads full patches: 1), so a streaming pass can size its chunks by memory.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ips.data.chunk_io import ChunkReader
from ips.data.sources import PatchSource
from ips.data.zarr_source import ZarrPatchSource, _pool
from ips.format.store import open_store


class CoarseView(PatchSource, Protocol):
    """A `PatchSource` of coarse patches with `scale`: its patches per full-resolution patch of memory."""

    scale: int


class PooledView:
    """`source`'s patches mean-pooled by `factor` along every spatial axis (uint8 rounded back to uint8):
    `read(indices)` -> `(n, C, *[s // factor])`. Each spatial side must divide by `factor`."""

    def __init__(self, source: PatchSource, factor: int) -> None:
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        if len(source.patch_shape) != source.spatial_dims + 1:
            raise ValueError(f"a coarse view needs pixel patches, got patch shape {source.patch_shape}")
        spatial = source.patch_shape[1:]
        if any(s % factor for s in spatial):
            raise ValueError(f"patch sides {spatial} do not divide by the coarse factor {factor}")
        self.source, self.factor = source, factor
        self.spatial_dims = source.spatial_dims
        self.patch_shape = (source.patch_shape[0], *(s // factor for s in spatial))
        self.scale = 1  # reads full patches

    def __len__(self) -> int:
        return len(self.source)

    def positions(self) -> np.ndarray:
        return self.source.positions()

    def read(self, indices: np.ndarray) -> torch.Tensor:
        x = self.source.read(indices)  # (n, C, *S)
        pool = F.avg_pool2d if self.spatial_dims == 2 else F.avg_pool3d
        y = pool(x.float(), self.factor)  # (n, C, *S / f)
        return (y + 0.5).floor().to(torch.uint8) if x.dtype == torch.uint8 else y.to(x.dtype)


class PyramidView:
    """The patches of `source` (a store's grid) read from the store level whose downsample is `factor`
    times the grid level's on the in-plane axes (z: whatever that level has). `read(indices)` ->
    `(n, C, *coarse)` in the store's dtype; `level` and `ratio` (per axis) say what is read.

    ValueError when the store has no such level or a patch side does not divide by its ratio."""

    def __init__(self, source: ZarrPatchSource, factor: int) -> None:
        store = open_store(source.location)
        base = store.level_downsample(source.info.level)
        self.level, self.ratio = _level_for(store, source.info.level, base, factor)
        patch = np.asarray(source.info.patch_size, dtype=np.int64)
        if np.any(patch % self.ratio):
            raise ValueError(
                f"patch size {tuple(patch)} does not divide by the level ratio {tuple(self.ratio)}"
            )
        array = store.level(self.level)
        reader = ChunkReader.for_array(
            array, source.background, written=store.written_keys(str(self.level)), name=store.name
        )
        if reader is None:
            raise ValueError(f"{store.name}: level {self.level} has a layout the chunk reader does not read")
        self._reader = reader
        self.source = source
        self.spatial_dims = source.spatial_dims
        self.patch_shape = (source.patch_shape[0], *(int(s) for s in patch // self.ratio))
        self.scale = int(np.prod(self.ratio))
        self._coords = source.coords // self.ratio  # (N, dims) pixels of the coarse level
        self.dtype = np.dtype(array.dtype)

    def __len__(self) -> int:
        return len(self.source)

    def positions(self) -> np.ndarray:
        return self.source.positions()

    def read(self, indices: np.ndarray) -> torch.Tensor:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((len(indices), *self.patch_shape), dtype=self.dtype)
        if indices.size == 0:
            return torch.from_numpy(out)
        coords = self._coords[indices]
        lo = np.concatenate([np.zeros((len(indices), 1), np.int64), coords], axis=1)  # (n, 1 + dims)
        threads = self.source.read_threads
        self._reader.read_boxes(
            lo, self.patch_shape, out, np.arange(len(indices)), _pool(threads - 1), threads
        )
        return torch.from_numpy(out)


def _level_for(store, grid_level: int, base: np.ndarray, factor: int) -> tuple[int, np.ndarray]:
    """The first store level above `grid_level` whose in-plane downsample is `factor` x `base`, and its
    integer ratio per axis `(dims,)`. ValueError when there is none."""
    for level in range(grid_level + 1, len(store.level_downsamples)):
        ratio = store.level_downsample(level) / base
        if np.allclose(ratio[-2:], factor) and np.allclose(ratio, np.rint(ratio)):
            return level, np.rint(ratio).astype(np.int64)
    raise ValueError(f"{store.name}: no pyramid level {factor}x above the grid's level {grid_level}")


def coarse_view(source: PatchSource, factor: int) -> CoarseView:
    """`source`'s patches `factor`x coarser: its store's pyramid level where it has one
    (`PyramidView`), else pooled (`PooledView`). ValueError for a source without pixels (features)."""
    if isinstance(source, ZarrPatchSource):
        try:
            return PyramidView(source, factor)
        except ValueError:
            pass
    return PooledView(source, factor)
