"""Pyramid planning and 2x mean downsampling.

Level k+1 halves level k along y and x (floor: `n // 2`, the odd last row/column is dropped, so level k
is exactly `shape0 // 2**k`), and along z for 3D volumes only while z is not much coarser than y, x
(its physical spacing is below twice theirs; the rule keeps anisotropic MRI/CT slabs from collapsing).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


def plan_levels(
    spatial_shape: tuple[int, ...],
    spacing: tuple[float, ...] | None,
    *,
    max_size: int = 512,
    min_levels: int = 1,
) -> list[tuple[int, ...]]:
    """Per-axis downsample factors of each level, `[(1, 1), (2, 2), ...]` (2D) or `[(1, 1, 1), ...]`.

    Levels are added until the longest y/x side is at most `max_size` and there are at least
    `min_levels`, as long as every y/x side stays >= 1 pixel.
    """
    dims = len(spatial_shape)
    factors = [tuple([1] * dims)]
    spacing = spacing or tuple([1.0] * dims)
    while True:
        cur = factors[-1]
        sizes = [n // f for n, f in zip(spatial_shape, cur)]
        if len(factors) >= min_levels and max(sizes[-2:]) <= max_size:
            break
        nxt = list(cur)
        for a in range(dims - 2, dims):  # y, x always halve
            nxt[a] = cur[a] * 2
        if dims == 3:
            sp = [s * f for s, f in zip(spacing, cur)]
            if sp[0] < 2 * min(sp[1:]) and sizes[0] >= 2:
                nxt[0] = cur[0] * 2
        if min(n // f for n, f in zip(spatial_shape, nxt)) < 1:
            break
        factors.append(tuple(nxt))
    return factors


def level_shape(spatial_shape: tuple[int, ...], factor: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n // f for n, f in zip(spatial_shape, factor))


def downsample2(block: np.ndarray, halve: tuple[bool, ...]) -> np.ndarray:
    """Mean over 2-blocks along the spatial axes flagged in `halve`.

    `block`: `(C, *spatial)` with even sizes on the halved axes. Integers are rounded half up and keep
    their dtype; floats stay floats. Returns `(C, *spatial')`.
    """
    if block.dtype == np.uint8 and halve[-1] and block.shape[-1] % 2 == 0:
        return _downsample2_uint8(block, halve)
    # sum of strided views (one per corner of the 2-block): ~10x faster than reshape + sum
    offsets = [(0, 1) if h else (None,) for h in halve]
    count = 2 ** sum(halve)
    if np.issubdtype(block.dtype, np.integer):
        # the narrowest accumulator that holds 8 summands (uint8 -> uint16 keeps the sum fast)
        size = {1: 2, 2: 4}.get(block.dtype.itemsize, 8)
        acc = np.dtype(f"{'u' if block.dtype.kind == 'u' else 'i'}{size}")
    else:
        acc = np.dtype(np.float64)
    total = None
    for corner in itertools.product(*offsets):
        view = block[(slice(None), *(slice(o, None, 2) if o is not None else slice(None) for o in corner))]
        total = view.astype(acc) if total is None else total.__iadd__(view)
    assert total is not None
    if acc.kind == "f":
        return (total / count).astype(block.dtype)
    return ((total + count // 2) // count).astype(block.dtype)


def _downsample2_uint8(block: np.ndarray, halve: tuple[bool, ...]) -> np.ndarray:
    """`downsample2` for uint8 with x halved: x pairs summed by viewing each pair of bytes as one uint16
    (`low + high`, whatever the byte order), then the other axes by strided adds; 2x faster."""
    pairs = np.ascontiguousarray(block).view(np.uint16)  # (C, ..., X / 2)
    total = pairs & 0xFF
    total += pairs >> 8
    count = 2
    for axis, h in enumerate(halve[:-1], start=1):
        if h:
            n = total.shape[axis] // 2 * 2
            even = total[(slice(None),) * axis + (slice(0, n, 2),)]
            odd = total[(slice(None),) * axis + (slice(1, n, 2),)]
            total = even + odd  # at most 8 * 255: fits uint16
            count *= 2
    total += count // 2
    total >>= count.bit_length() - 1  # / count (a power of 2), rounded half up
    return total.astype(np.uint8)


def morton_order(grid: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every index of an n-d grid in Z-order (bit-interleaved), so 2**d neighbours come together."""
    return list(_morton(tuple(grid)))


@functools.lru_cache(maxsize=64)
def _morton(grid: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:

    def key(idx: tuple[int, ...]) -> int:
        code = 0
        for bit in range(max(max(grid).bit_length(), 1)):
            for a, i in enumerate(idx):
                code |= ((i >> bit) & 1) << (bit * len(idx) + (len(idx) - 1 - a))
        return code

    return tuple(sorted(np.ndindex(*grid), key=key))


class ChunkSink(Protocol):
    """One pyramid level as `StreamingPyramid` writes it (`data_prep.writer.ShardEncoder`): spatial
    `shape`, `chunk` and `shard` shapes, the `fill_value`, and chunk-by-chunk shard writing."""

    shape: tuple[int, ...]
    chunk: tuple[int, ...]
    shard: tuple[int, ...]
    fill_value: Any

    def put_chunk(self, shard: tuple[int, ...], pos: tuple[int, ...], chunk: np.ndarray) -> None: ...

    def close_shard(self, shard: tuple[int, ...]) -> None: ...


class StreamingPyramid:
    """Builds levels 1.. from level-0 blocks as they are written, chunk by chunk, without reading
    anything back.

    A level-0 block, downsampled, lands in level 1's chunks. A level-k chunk is handed to its level's
    sink (`put_chunk`, which encodes it) as soon as all its pixels have arrived, then downsampled into
    level k+1; a shard is closed (`close_shard`) when its last chunk is in. What waits in memory is the
    chunks that still miss pixels: with level-0 blocks fed in Z-order (`morton_order`), one or two per
    level, whatever the shard size (`peak_buffered` counts their bytes). Along an axis that halves, a
    chunk of odd size is downsampled in pairs (a unit of two chunks), so no pixel pair is split.
    Thread-safe.

    Args:
        levels: the sink of every level (level 0's gives its shard shape; it is written by the caller).
        factors: per-axis downsample of every level.
    """

    def __init__(self, levels: Sequence[ChunkSink], factors: list[tuple[int, ...]]) -> None:
        import threading

        self._levels, self._factors = levels, factors
        self._units = [self._unit(k) for k in range(len(levels))]
        self._pending: dict[tuple[int, tuple[int, ...]], list] = {}  # (k, unit) -> [pixels, missing count]
        self._left: dict[tuple[int, tuple[int, ...]], int] = {}  # (k, shard) -> chunks not yet put
        self._lock = threading.Lock()
        self.buffered = self.peak_buffered = 0  # bytes of partly filled units, now and at most
        if len(levels) > 1:
            lev = levels[0]
            for n, s, h in zip(lev.shape, lev.shard, self._halve(1)):
                if h and s % 2 and n > s:
                    raise ValueError(f"level-0 shard {lev.shard} is odd along an axis that halves")

    def _halve(self, k: int) -> tuple[bool, ...]:
        return tuple(b // a == 2 for a, b in zip(self._factors[k - 1], self._factors[k]))

    def _unit(self, k: int) -> tuple[int, ...]:
        """Level k's unit of completion: its chunk, doubled along an axis that halves where it is odd."""
        chunk = self._levels[k].chunk
        if k + 1 >= len(self._levels):
            return chunk
        return tuple(2 * c if h and c % 2 else c for c, h in zip(chunk, self._halve(k + 1)))

    def add(self, start: tuple[int, ...], block: np.ndarray) -> None:
        """Level-0 pixels `block` `(C, *size)` at spatial `start` (a whole shard, already written)."""
        work = [(0, start, block)]
        while work:
            k, start, pixels = work.pop()
            if k + 1 >= len(self._levels):
                continue
            halve = self._halve(k + 1)
            even = pixels[
                (
                    slice(None),
                    *(slice(0, n // 2 * 2) if h else slice(None) for n, h in zip(pixels.shape[1:], halve)),
                )
            ]
            if even.size == 0:
                continue  # a last odd row/column of 1 pixel: nothing of it survives the floor
            down = downsample2(even, halve)
            at = tuple(s // 2 if h else s for s, h in zip(start, halve))
            for ustart, unit in self._place(k + 1, at, down):
                self._emit(k + 1, ustart, unit)
                work.append((k + 1, ustart, unit))

    def _place(
        self, k: int, start: tuple[int, ...], pixels: np.ndarray
    ) -> list[tuple[tuple[int, ...], np.ndarray]]:
        """Put level-k `pixels` at `start` into its units; returns the units now complete, `(start,
        pixels)` clipped to the level (views of `pixels` where a unit lies wholly inside them)."""
        unit, shape = self._units[k], self._levels[k].shape
        end = tuple(s + n for s, n in zip(start, pixels.shape[1:]))
        ranges = [range(s // u, -(-e // u)) for s, e, u in zip(start, end, unit)]
        done = []
        # in Z-order, so the units above them fill (and leave memory) in turn, one or two at a time
        for rel in _morton(tuple(len(r) for r in ranges)):
            uidx = tuple(r[i] for r, i in zip(ranges, rel))
            lo = tuple(i * u for i, u in zip(uidx, unit))
            hi = tuple(min(a + u, n) for a, u, n in zip(lo, unit, shape))
            a = tuple(max(x, s) for x, s in zip(lo, start))
            b = tuple(min(x, e) for x, e in zip(hi, end))
            src = pixels[(slice(None), *(slice(x - s, y - s) for x, y, s in zip(a, b, start)))]
            if a == lo and b == hi:  # the whole unit is here
                done.append((lo, src))
                continue
            with self._lock:
                entry = self._pending.get((k, uidx))
                if entry is None:
                    size = tuple(y - x for x, y in zip(lo, hi))
                    entry = self._pending[(k, uidx)] = [
                        np.empty((pixels.shape[0], *size), pixels.dtype),
                        math.prod(size),
                    ]
                    self.buffered += entry[0].nbytes
                    self.peak_buffered = max(self.peak_buffered, self.buffered)
                entry[0][(slice(None), *(slice(x - o, y - o) for x, y, o in zip(a, b, lo)))] = src
                entry[1] -= math.prod(y - x for x, y in zip(a, b))
                if entry[1] == 0:
                    del self._pending[(k, uidx)]
                    self.buffered -= entry[0].nbytes
                    done.append((lo, entry[0]))
        return done

    def _emit(self, k: int, start: tuple[int, ...], unit: np.ndarray) -> None:
        """Hand the chunks of a complete level-k unit at `start` to the level's sink (edge chunks padded
        with the fill value); close each shard whose last chunk this was."""
        lev = self._levels[k]
        per_shard = tuple(s // c for s, c in zip(lev.shard, lev.chunk))
        offsets = [range(0, n, c) for n, c in zip(unit.shape[1:], lev.chunk)]
        for off in itertools.product(*offsets):
            chunk = unit[(slice(None), *(slice(o, o + c) for o, c in zip(off, lev.chunk)))]
            if chunk.shape[1:] != lev.chunk:
                padded = np.full((unit.shape[0], *lev.chunk), lev.fill_value, dtype=unit.dtype)
                padded[(slice(None), *(slice(0, n) for n in chunk.shape[1:]))] = chunk
                chunk = padded
            g = tuple((s + o) // c for s, o, c in zip(start, off, lev.chunk))
            shard = tuple(i // p for i, p in zip(g, per_shard))
            lev.put_chunk(shard, tuple(i % p for i, p in zip(g, per_shard)), chunk)
            with self._lock:
                left = self._left.get((k, shard))
                left = (self._chunks_in(k, shard) if left is None else left) - 1
                if left:
                    self._left[(k, shard)] = left
                else:
                    self._left.pop((k, shard), None)
            if not left:
                lev.close_shard(shard)

    def _chunks_in(self, k: int, shard: tuple[int, ...]) -> int:
        """How many chunks of level-k shard `shard` lie (at least partly) inside the level."""
        lev = self._levels[k]
        n = 1
        for i, s, c, size in zip(shard, lev.shard, lev.chunk, lev.shape):
            n *= len(range(i * s, min((i + 1) * s, size), c))
        return n

    @property
    def pending(self) -> int:
        """Units waiting for pixels and shards waiting for chunks (0 once every level-0 block was added)."""
        return len(self._pending) + len(self._left)
