"""Pyramid planning and 2x mean downsampling.

Level k+1 halves level k along y and x (floor: `n // 2`, the odd last row/column is dropped, so level k
is exactly `shape0 // 2**k`), and along z for 3D volumes only while z is not much coarser than y, x
(its physical spacing is below twice theirs; the rule keeps anisotropic MRI/CT slabs from collapsing).
"""

from __future__ import annotations

import itertools

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

    def key(idx: tuple[int, ...]) -> int:
        code = 0
        for bit in range(max(max(grid).bit_length(), 1)):
            for a, i in enumerate(idx):
                code |= ((i >> bit) & 1) << (bit * len(idx) + (len(idx) - 1 - a))
        return code

    return sorted(np.ndindex(*grid), key=key)


class StreamingPyramid:
    """Builds levels 1.. from level-0 blocks as they are written, without reading anything back.

    Level k is sharded like level 0 (`shard`, spatial). A level-(k-1) shard, downsampled, is one
    2**d-th of a level-k shard; each level-k shard is assembled in memory from its children and written
    once, whole, when the last child arrives, then fed to level k+1. Feed level-0 shards in Z-order
    (`morton_order`) and only a few shards per level are pending at a time. Thread-safe.

    Args:
        write: `write(k, start, data)` stores `data` `(C, *size)` at spatial `start` of level k.
        shapes: spatial shape of every level; factors: per-axis downsample of every level.
        shard: spatial shard shape (the block size at every level).
    """

    def __init__(
        self, write, shapes: list[tuple[int, ...]], factors: list[tuple[int, ...]], shard: tuple[int, ...]
    ) -> None:
        import threading

        self._write, self._shapes, self._factors, self._shard = write, shapes, factors, shard
        self._pending: dict[tuple[int, tuple[int, ...]], list] = {}  # (k, parent idx) -> [buffer, count]
        self._lock = threading.Lock()

    def _halve(self, k: int) -> tuple[bool, ...]:
        return tuple(b // a == 2 for a, b in zip(self._factors[k - 1], self._factors[k]))

    def _grid(self, k: int) -> tuple[int, ...]:
        return tuple(-(-n // s) for n, s in zip(self._shapes[k], self._shard))

    def _n_children(self, k: int, parent: tuple[int, ...]) -> int:
        """How many level-(k-1) shards make up level-k shard `parent`."""
        halve, child_grid = self._halve(k), self._grid(k - 1)
        n = 1
        for p, h, g in zip(parent, halve, child_grid):
            n *= len([c for c in ((2 * p, 2 * p + 1) if h else (p,)) if c < g])
        return n

    def add(self, k: int, idx: tuple[int, ...], block: np.ndarray) -> None:
        """Level-k shard `idx` (already written) with pixels `block` `(C, *size)`: feed level k+1."""
        while k + 1 < len(self._shapes):
            k += 1
            halve = self._halve(k)
            down = downsample2(
                block[
                    (
                        slice(None),
                        *(slice(0, n // 2 * 2) if h else slice(None) for n, h in zip(block.shape[1:], halve)),
                    )
                ],
                halve,
            )
            parent = tuple(i // 2 if h else i for i, h in zip(idx, halve))
            if any(p >= g for p, g in zip(parent, self._grid(k))):
                return  # a last odd row/column of 1 pixel: nothing of it survives the floor
            start = tuple(p * s for p, s in zip(parent, self._shard))
            size = tuple(min(s, n - o) for s, n, o in zip(self._shard, self._shapes[k], start))
            # where the child lands inside the parent shard
            off = tuple((i % 2) * (s // 2) if h else 0 for i, h, s in zip(idx, halve, self._shard))
            with self._lock:
                key = (k, parent)
                if key not in self._pending:
                    self._pending[key] = [np.empty((block.shape[0], *size), block.dtype), 0]
                entry = self._pending[key]
                region = tuple(slice(o, o + n) for o, n in zip(off, down.shape[1:]))
                entry[0][(slice(None), *region)] = down
                entry[1] += 1
                if entry[1] < self._n_children(k, parent):
                    return
                del self._pending[key]
            self._write(k, start, entry[0])
            idx, block = parent, entry[0]

    @property
    def pending(self) -> int:
        """Shards waiting for children (0 once every level-0 shard was added)."""
        return len(self._pending)
