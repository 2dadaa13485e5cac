"""Patch sources over ips stores: pixels of a grid (`ZarrPatchSource`) and precomputed features
(`FeatureSource`). Both implement the `PatchSource` protocol of `ips.data.sources`.

A source holds O(N) scalars (the grid coords) and nothing else of the slide: `read` returns only the
patches asked for. Two read paths, same result:

- the usual one, for stores whose codecs `ips.data.chunk_io.ChunkReader` handles (all that `ips prep`
  writes): patches are assembled from whole chunks read straight from their shards, each chunk decoded
  once per call (straight into the output where a patch is exactly one chunk) in a thread pool;
- the fallback, zarr's own reads: requested patches are grouped by the shard their corner falls in; a
  dense group is read as one box, a sparse one as runs of touching patches; all boxes of one `read` are
  gathered in a single zarr event-loop call so zarr's own concurrency overlaps them.

docs/BENCHMARKS.md (`## Loader`) has the measurements behind these choices.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from zarr.core.sync import sync

from ips.data.chunk_io import ChunkReader
from ips.data.store import IpsStore, StoreLocation, open_store
from ips.format import names as sf

# a group whose patches fill at least this share of their bounding box is read as that one box
DENSE_FRACTION = 0.5


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor | None:
    """A process-wide pool of `threads` reader threads, shared by all sources (None for 0)."""
    if threads < 1:
        return None
    with _POOLS_LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="ips-read")
        return _POOLS[threads]


def _forget_pools() -> None:
    # a forked DataLoader worker inherits the dict but not the threads
    _POOLS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


class _Box:
    """One zarr request: a spatial box `[lo, hi)` (clamped to the array) and the patches it serves."""

    __slots__ = ("lo", "hi", "members")

    def __init__(self, lo: np.ndarray, hi: np.ndarray, members: np.ndarray) -> None:
        self.lo, self.hi, self.members = lo, hi, members


def plan_boxes(
    coords: np.ndarray,
    patch: np.ndarray,
    shard: np.ndarray,
    shape: np.ndarray,
    dense_fraction: float = DENSE_FRACTION,
) -> list[_Box]:
    """Group patches (top-left `coords` `(n, d)`, size `patch` `(d,)`) into read boxes.

    Patches are grouped by the shard (`shard` `(d,)` pixels) holding their corner. A group that is dense
    in its bounding box is one box; otherwise it is split into runs of patches that touch along the
    last axis. Boxes are clamped to the array `shape` `(d,)`; `members` index into `coords`.
    """
    n, d = coords.shape
    if n == 0:
        return []
    shard_idx = coords // shard
    # sort by (shard, then coords row-major) so each shard's patches are contiguous and in raster order
    keys = [coords[:, k] for k in reversed(range(d))] + [shard_idx[:, k] for k in reversed(range(d))]
    order = np.lexsort(keys)
    s_sorted = shard_idx[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = np.any(s_sorted[1:] != s_sorted[:-1], axis=1)
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], n)
    patch_vol = float(np.prod(patch))
    boxes: list[_Box] = []
    for a, b in zip(starts, ends):
        members = order[a:b]
        c = coords[members]
        lo, hi = c.min(axis=0), c.max(axis=0) + patch
        if len(members) * patch_vol >= dense_fraction * float(np.prod(hi - lo)):
            boxes.append(_Box(lo, hi, members))
            continue
        # sparse: runs of patches on the same leading coords that touch along the last axis
        lead_change = np.any(c[1:, :-1] != c[:-1, :-1], axis=1)
        gap = c[1:, -1] > c[:-1, -1] + patch[-1]
        cut = np.flatnonzero(lead_change | gap) + 1
        for run in np.split(np.arange(len(members)), cut):
            rc = c[run]
            boxes.append(_Box(rc.min(axis=0), rc.max(axis=0) + patch, members[run]))
    for box in boxes:
        box.lo = np.clip(box.lo, 0, shape)
        box.hi = np.clip(box.hi, 0, shape)
    return boxes


class ZarrPatchSource:
    """The patches of one grid of an ips store.

    Args:
        store: path (or URL / zarr store) of a complete ips store.
        grid: grid name (`grids/<name>`).
        read_threads: threads that read and decode shards in parallel: the calling thread plus
            `read_threads - 1` from a process-wide pool (1 = the calling thread only). On the zarr
            fallback path: the most zarr requests in flight at once.
        direct_chunks: use the direct chunk reader where the grid allows; False forces zarr's generic
            reads (benchmarks, debugging).

    `read(indices)` returns `(n, C, H, W)` (2D) or `(n, C, D, H, W)` (3D) in the store's dtype (uint8
    for slides), in the order asked; parts of a patch outside the image hold the store's `background`.
    Picklable: the zarr handles are reopened lazily after unpickling (DataLoader workers).
    """

    def __init__(
        self,
        store: StoreLocation,
        grid: str = sf.DEFAULT_GRID,
        read_threads: int = 4,
        *,
        direct_chunks: bool = True,
    ) -> None:
        if read_threads < 1:
            raise ValueError(f"read_threads must be >= 1, got {read_threads}")
        opened = open_store(store)
        self.location = store
        self.grid = grid
        self.read_threads = read_threads
        self.info = opened.grid(grid)
        self.spatial_dims = opened.spatial_dims
        self.background = opened.background
        # to the source's level 0 (a store made with --store-from grid begins at a lower level)
        self.level_downsample = tuple(float(v) for v in opened.level_downsample(self.info.level))
        array = opened.level(self.info.level)
        if array.ndim != self.spatial_dims + 1:
            raise ValueError(
                f"{opened.name}: level {self.info.level} has {array.ndim} axes, expected "
                f"{self.spatial_dims + 1} (c + {self.spatial_dims} spatial)"
            )
        self.coords = opened.coords(grid)  # int64 (N, dims), pixels of the grid's level
        self._positions = (self.coords / np.asarray(self.info.stride, dtype=np.float64)).astype(np.float32)
        self.dtype = np.dtype(array.dtype)
        self.patch_shape = (array.shape[0], *self.info.patch_size)
        self._shape = np.asarray(array.shape[1:], dtype=np.int64)
        shards = array.shards or array.chunks
        self._shard = np.asarray(shards[1:], dtype=np.int64)
        self._patch = np.asarray(self.info.patch_size, dtype=np.int64)
        self._store: IpsStore | None = opened
        self._array: Any = array.async_array
        self._chunks = self._reader(opened, array) if direct_chunks else None
        self._direct = self._chunks is not None

    # --- pickling: keep the O(N) metadata, reopen zarr lazily ---------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"] = None
        state["_array"] = None
        state["_chunks"] = None
        return state

    def _open(self) -> None:
        self._store = open_store(self.location)
        array = self._store.level(self.info.level)
        self._array = array.async_array
        self._chunks = self._reader(self._store, array) if self._direct else None

    def _reader(self, opened: IpsStore, array: Any) -> ChunkReader | None:
        return ChunkReader.for_array(
            array, self.background, written=opened.written_keys(str(self.info.level)), name=opened.name
        )

    def _async_array(self) -> Any:
        if self._array is None:
            self._open()
        return self._array

    # --- PatchSource --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.coords)

    def positions(self) -> np.ndarray:
        """Grid positions (coords / stride), float32 `(N, spatial_dims)`."""
        return self._positions

    def read(self, indices: np.ndarray) -> torch.Tensor:
        """Patches at `indices` int `(n,)`, in that order: `(n, C, *patch_size)`."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self.coords)
        if indices.size and (indices.min() < -n or indices.max() >= n):
            raise IndexError(f"patch index out of range for a grid of {n} patches")
        out = np.empty((len(indices), *self.patch_shape), dtype=self.dtype)
        if indices.size == 0:
            return torch.from_numpy(out)
        # each distinct patch is read once, into the first slot that asks for it, then copied to repeats
        uniq, first, inverse = np.unique(indices % n, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        coords = self.coords[uniq]
        if self._direct:
            if self._chunks is None:
                self._open()
            assert self._chunks is not None
            lo = np.concatenate([np.zeros((len(uniq), 1), np.int64), coords], axis=1)  # (n, 1 + dims)
            self._chunks.read_boxes(
                lo, self.patch_shape, out, first, _pool(self.read_threads - 1), self.read_threads
            )
        else:
            boxes = plan_boxes(coords, self._patch, self._shard, self._shape)
            datas = sync(self._read_boxes(self._async_array(), boxes))
            for box, data in zip(boxes, datas):
                self._scatter(box, data, coords, out, first)
        if len(uniq) < len(indices):
            repeats = np.flatnonzero(first[inverse] != np.arange(len(indices)))
            out[repeats] = out[first[inverse[repeats]]]
        return torch.from_numpy(out)

    async def _read_boxes(self, array: Any, boxes: list[_Box]) -> list[np.ndarray]:
        limit = asyncio.Semaphore(self.read_threads)

        async def one(box: _Box) -> np.ndarray:
            sel = (slice(None),) + tuple(slice(int(a), int(b)) for a, b in zip(box.lo, box.hi))
            async with limit:
                return np.asarray(await array.getitem(sel))

        return await asyncio.gather(*(one(b) for b in boxes))

    def _scatter(
        self, box: _Box, data: np.ndarray, coords: np.ndarray, out: np.ndarray, slots: np.ndarray
    ) -> None:
        """Copy member patch j of the box's `data` `(C, *box)` to `out[slots[j]]`; pad outside the image."""
        for j in box.members:
            patch = out[slots[j]]
            lo = coords[j]
            hi = lo + self._patch
            a = np.maximum(lo, box.lo)
            b = np.minimum(hi, box.hi)
            if np.any(a != lo) or np.any(b != hi):
                patch[...] = self.background  # the patch sticks out of the image
                if np.any(b <= a):
                    continue
            dst = (slice(None),) + tuple(slice(int(x - y), int(z - y)) for x, z, y in zip(a, b, lo))
            src = (slice(None),) + tuple(slice(int(x - y), int(z - y)) for x, z, y in zip(a, b, box.lo))
            patch[dst] = data[src]

    def read_boxes(self, lo: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
        """Boxes of the grid's level: top-left corners `lo` int `(n, dims)` in that level's pixels (may lie
        outside the image), spatial `size` `(dims,)` -> `(n, C, *size)` in the store's dtype, the part
        outside the image holding the store's `background`. Same read paths as `read`."""
        lo = np.asarray(lo, dtype=np.int64).reshape(-1, self.spatial_dims)
        size = tuple(int(s) for s in size)
        out = np.empty((len(lo), self.patch_shape[0], *size), dtype=self.dtype)
        if len(lo) == 0:
            return out
        if self._direct:
            if self._chunks is None:
                self._open()
            assert self._chunks is not None
            full = np.concatenate([np.zeros((len(lo), 1), np.int64), lo], axis=1)  # (n, 1 + dims)
            slots = np.arange(len(lo), dtype=np.int64)
            threads = self.read_threads
            self._chunks.read_boxes(full, out.shape[1:], out, slots, _pool(threads - 1), threads)
            return out
        out[...] = self.background
        hi = lo + np.asarray(size, dtype=np.int64)
        a, b = np.clip(lo, 0, self._shape), np.clip(hi, 0, self._shape)
        inside = np.flatnonzero(np.all(b > a, axis=1))
        boxes = [_Box(a[j], b[j], np.asarray([j])) for j in inside]
        datas = sync(self._read_boxes(self._async_array(), boxes))
        for box, data in zip(boxes, datas):
            j = int(box.members[0])
            dst = (slice(None),) + tuple(
                slice(int(x - y), int(z - y)) for x, z, y in zip(box.lo, box.hi, lo[j])
            )
            out[j][dst] = data
        return out

    def level0_coords(self) -> np.ndarray:
        """Top-left corners in level-0 pixels, int64 `(N, dims)` (for heatmaps and GeoJSON)."""
        down = np.asarray(self.level_downsample)
        return np.rint(self.coords * down).astype(np.int64)


class RegionReader:
    """Boxes of one pyramid level of an opened store, read through the same checked chunk reader as the
    patch sources (what `ips predict` reads): recorded chunks checked, links and reads outside the store
    refused, damage a one-line `StoreError`. For the viewer's tiles and galleries.

    `shape`: the level's `(C, *spatial)`; `read(start, size)` -> `(C, *size)` in the store's dtype, the
    part outside the level filled with the store's `background`. Thread-safe.
    """

    def __init__(self, store: IpsStore, level: int) -> None:
        array = store.level(level)  # metadata checked against the marker
        self.store, self.level = store, level
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.background = store.background
        self._chunks = ChunkReader.for_array(
            array, self.background, written=store.written_keys(str(level)), name=store.name
        )
        self._array = array

    def read(self, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
        """The box `[start, start + size)` of the level's spatial axes: `(C, *size)`."""
        if len(start) != len(self.shape) - 1 or len(size) != len(start) or min(size, default=1) < 1:
            raise ValueError(f"a box of {len(self.shape) - 1} spatial axes, sizes >= 1; got {start}, {size}")
        out = np.empty((1, self.shape[0], *size), dtype=self.dtype)
        if self._chunks is not None:
            lo = np.asarray([[0, *start]], dtype=np.int64)
            self._chunks.read_boxes(lo, (self.shape[0], *size), out, np.zeros(1, np.int64))
            return out[0]
        # a layout the chunk reader does not handle: zarr's own read (still through the checked store)
        out[...] = self.background
        lo = [max(0, a) for a in start]
        hi = [min(n, a + b) for a, b, n in zip(start, size, self.shape[1:])]
        if all(h > a for a, h in zip(lo, hi)):
            data = self._array[(slice(None), *(slice(a, h) for a, h in zip(lo, hi)))]
            dst = tuple(slice(a - s, h - s) for a, h, s in zip(lo, hi, start))
            out[(0, slice(None), *dst)] = data
        return out[0]


class FeatureSource:
    """Precomputed feature vectors of one feature set: `read(indices)` -> float32 `(n, F)`.

    Positions are the feature coords divided by the stride of the grid they were computed on.
    Picklable like `ZarrPatchSource`.
    """

    def __init__(self, store: StoreLocation, features: str = sf.DEFAULT_GRID) -> None:
        opened = open_store(store)
        self.location = store
        self.features = features
        self.info = opened.feature(features)
        self.spatial_dims = opened.spatial_dims
        array = opened.embeddings(features)
        if array.ndim != 2:
            raise ValueError(
                f"{opened.name}: features {features!r} have shape {array.shape}, expected (N, F)"
            )
        self.patch_shape = (int(array.shape[1]),)
        coords = np.asarray(
            opened.group[f"{sf.FEATURES_GROUP}/{features}/{sf.COORDS_ARRAY}"][...], dtype=np.int64
        )
        if len(coords) != array.shape[0]:
            raise ValueError(
                f"{opened.name}: features {features!r} have {array.shape[0]} vectors but {len(coords)} coords"
            )
        stride = opened.grid(self.info.grid).stride
        self.coords = coords
        self._positions = (coords / np.asarray(stride, dtype=np.float64)).astype(np.float32)
        self._array: Any = array

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_array"] = None
        return state

    def _embeddings(self) -> Any:
        if self._array is None:
            self._array = open_store(self.location).embeddings(self.features)
        return self._array

    def __len__(self) -> int:
        return len(self.coords)

    def positions(self) -> np.ndarray:
        return self._positions

    def read(self, indices: np.ndarray) -> torch.Tensor:
        """Feature vectors at `indices` int `(n,)`, in that order: float32 `(n, F)`."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self.coords)
        if indices.size == 0:
            return torch.empty((0, *self.patch_shape), dtype=torch.float32)
        if indices.min() < -n or indices.max() >= n:
            raise IndexError(f"feature index out of range for {n} vectors")
        # orthogonal selection of sorted unique rows reads each chunk once
        uniq, inverse = np.unique(indices % n, return_inverse=True)
        rows = np.asarray(self._embeddings().oindex[uniq, :], dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(rows[inverse.reshape(-1)]))
