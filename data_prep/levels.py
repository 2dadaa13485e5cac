"""A source seen from one of its pyramid levels, for `ips prep --store-from grid`: the store then begins
at the grid's level instead of the source's level 0 (a 20x grid on a 40x scan stores a quarter of the
pixels).

Level k of the store's pyramid plan (`data_prep.pyramid.plan_levels`, per-axis factors `f`) is, as an
image: shape `n // f` per axis; pixels read from the finest source level that the source holds itself
(`ImageReader.native_levels`: its own pyramid, e.g. a 4x level of an SVS) at a plan factor `g` dividing
`f`, then the remaining steps as the 2x means of `data_prep.pyramid.downsample2`, the same steps a
level-0 store's pyramid takes. So without a native level the store's level 0 equals the level-0 store's
level k exactly, and with one it is the source's own pixels of that level (as OpenSlide and QuPath show
them), cut to `n // f`.

Coordinates: store pixel `i` covers source level-0 pixels `[i * f, (i + 1) * f)` per axis; the store
records `f` (`ips.source_level.downsample`), and everything that reports level-0 coordinates maps
through it (`ips.data.store.IpsStore.level_downsample`).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.pyramid import downsample2, level_shape
from data_prep.readers import ImageReader


class LevelReader(ImageReader):
    """`source` at level `k` of the pyramid plan `factors` (per-axis factors from its level 0), read as a
    level-0 image `(C, *(n // factors[k]))` with spacing `spacing * factors[k]`.

    Regions are read from native level `native_level` of the source (`ratio` times larger per axis) and
    halved `len(steps)` times (`steps`: which axes each 2x step halves).
    """

    name = "level"

    def __init__(self, source: ImageReader, factors: list[tuple[int, ...]], k: int) -> None:
        self.source, self.level, self.factor = source, k, tuple(int(f) for f in factors[k])
        self.shape = (source.shape[0], *level_shape(source.spatial_shape, self.factor))
        self.dtype, self.background, self.vendor = source.dtype, source.background, source.vendor
        self.affine, self.path = source.affine, source.path
        self.spacing = tuple(s * f for s, f in zip(source.spacing, self.factor)) if source.spacing else None
        natives = {tuple(f): i for i, (f, _) in enumerate(source.native_levels())}
        m = max(j for j in range(k + 1) if tuple(factors[j]) in natives)  # level 0 always is
        self.native_level = natives[tuple(factors[m])]
        self.ratio = tuple(a // b for a, b in zip(self.factor, factors[m]))
        self.steps = [tuple(b // a == 2 for a, b in zip(factors[j], factors[j + 1])) for j in range(m, k)]

    @classmethod
    def accepts(cls, path: Path, head: bytes) -> bool:
        return False

    def _read(self, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
        """`(C, *size)`. The source is read in pieces of at most `size` source pixels per axis, each
        downsampled on its own (the 2x means stay inside `ratio`-aligned blocks, so the pixels equal
        those of one whole read): memory stays at one block of `size` however large `ratio` is, and
        the source decodes cache-sized regions (one region `ratio` times larger decodes slower)."""
        if all(r == 1 for r in self.ratio):
            return self.source.read_level_region(self.native_level, start, size)
        piece = tuple(-(-n // r) for n, r in zip(size, self.ratio))  # output pixels per piece and axis
        out = np.empty((self.shape[0], *size), dtype=self.dtype)
        for lo, n in _tiles(size, piece):
            src_start = tuple((s + o) * r for s, o, r in zip(start, lo, self.ratio))
            src_size = tuple(m * r for m, r in zip(n, self.ratio))
            block = self.source.read_level_region(self.native_level, src_start, src_size)  # (C, *n * ratio)
            for halve in self.steps:
                block = downsample2(block, halve)
            out[(slice(None), *(slice(o, o + m) for o, m in zip(lo, n)))] = block
        return out

    def record(self) -> dict[str, Any]:
        """The store's `ips.source_level`: which source level its level 0 is, and how it was made."""
        how = f"{len(self.steps)} x 2x mean of " if self.steps else ""
        return {
            "pyramid_level": self.level,
            "downsample": list(self.factor),
            "native_level": self.native_level,
            "method": f"{how}source level {self.native_level}",
        }

    def metadata(self) -> dict[str, Any]:
        return self.source.metadata()

    def close(self) -> None:
        self.source.close()


def _tiles(shape: tuple[int, ...], tile: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """`(start, size)` of the tiles of `tile` covering `shape` (edge tiles clipped)."""
    ranges = [range(0, n, t) for n, t in zip(shape, tile)]
    return [
        (lo, tuple(min(t, n - o) for o, t, n in zip(lo, tile, shape))) for lo in itertools.product(*ranges)
    ]


def level0_record(dims: int) -> dict[str, Any]:
    """`ips.source_level` of a store that begins at the source's level 0."""
    return {"pyramid_level": 0, "downsample": [1] * dims, "native_level": 0, "method": "source level 0"}
