"""A real-size, 40x-like pyramidal TIFF written tile by tile: the whole image is never in memory.

The slide is H&E-like tissue (the texture of `ips.synthetic.marks.tissue_od`, enlarged so nuclei have a
40x size) inside smooth, slide-wide tissue regions on a near-white background. Every pixel is a
function of its position and the seed only:

- the tissue share `alpha` is a smooth field on a coarse grid (one value per `COARSE` px), bilinearly
  interpolated, so tissue regions span many tiles;
- the texture of a tile is a window of one of a few pre-rendered texture sheets, chosen from the tile's
  index, so a tile costs a crop and a blend, not a fresh rendering.

Level 0 carries the resolution tags of `mpp` (0.25 um/px, a 40x scan); each reduced level (a SubIFD,
as `ips prep` reads them) is the previous one pooled 2x2 with the rounded mean `(a + b + c + d + 2) // 4`.
Reduced levels are built from a raw scratch file of pooled tiles beside the output, written while the
level above is written, so memory holds a few tiles, the texture sheets and the coarse field (one float
per `COARSE`^2 px of level 0): never a level.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ips.synthetic.lesions import _smooth_field
from ips.synthetic.marks import od_to_rgb, tissue_od

COARSE = 64  # px of level 0 per value of the tissue-share field
BACKGROUND = (242.0, 240.0, 244.0)  # glass, slightly off-white
TEXTURE_ZOOM = 4  # tissue_od draws nuclei of 1.5-3 px radius; x4 gives a 40x nucleus
N_SHEETS = 6


@dataclass(frozen=True)
class BigSlideSpec:
    """What to write: `size` x `size` px RGB at `mpp` um/px, `tile` px JPEG (or other) tiles."""

    size: int = 60_000
    seed: int = 0
    tile: int = 512
    mpp: float = 0.25
    compression: str | None = "jpeg"
    quality: int = 90
    tissue_share: float = 0.4  # about this share of the slide is tissue

    def __post_init__(self) -> None:
        if self.tile < 16 or self.tile % 16:
            raise ValueError(f"tile {self.tile} must be a multiple of 16 (a TIFF rule)")
        if self.size < 2 * self.tile:
            raise ValueError(f"size {self.size} must be at least two tiles ({2 * self.tile} px)")
        if not self.mpp > 0:
            raise ValueError(f"mpp {self.mpp} must be positive")
        if not 0.0 < self.tissue_share < 1.0:
            raise ValueError(f"tissue_share {self.tissue_share} must be in (0, 1)")

    def level_shapes(self) -> list[tuple[int, int]]:
        """`(H, W)` of every level: halved (floored) while the level stays at least one tile."""
        shapes = [(self.size, self.size)]
        while shapes[-1][0] // 2 >= self.tile:
            shapes.append((shapes[-1][0] // 2, shapes[-1][1] // 2))
        return shapes


class _Painter:
    """Level-0 pixels of tile `(ty, tx)`: the tissue-share field blended with a texture sheet window."""

    def __init__(self, spec: BigSlideSpec) -> None:
        self.spec = spec
        rng = np.random.default_rng(spec.seed)
        cells = -(-spec.size // COARSE) + 2  # one more at each end for the bilinear interpolation
        # ~ one tissue region per 8,000 px, smooth at that scale
        field = _smooth_field(rng, (cells, cells), max(2, spec.size // 8000))
        self.threshold = float(np.quantile(field, 1.0 - spec.tissue_share))
        self.field = field  # (cells, cells) float32, a 1/COARSE^2 of the pixel count
        side = 2 * spec.tile
        small = -(-side // TEXTURE_ZOOM)
        self.sheets = []  # N_SHEETS x (side, side, 3) uint8
        for _ in range(N_SHEETS):
            od = tissue_od(rng, small, small)  # (s, s, 3)
            od = ndimage.zoom(od, (TEXTURE_ZOOM, TEXTURE_ZOOM, 1), order=1)[:side, :side]
            grain = 0.02 * rng.standard_normal((side, side, 1)).astype(np.float32)
            self.sheets.append(np.ascontiguousarray(od_to_rgb(od + grain).transpose(1, 2, 0)))

    def alpha(self, y0: int, x0: int, n: int) -> np.ndarray:
        """Tissue share `(n, n)` float32 in [0, 1] of the block at `(y0, x0)`, bilinear on the field."""
        fy, fx = (np.arange(y0, y0 + n) + 0.5) / COARSE, (np.arange(x0, x0 + n) + 0.5) / COARSE
        iy, ix = np.floor(fy).astype(int), np.floor(fx).astype(int)
        wy, wx = (fy - iy).astype(np.float32)[:, None], (fx - ix).astype(np.float32)[None, :]
        iy, ix = np.minimum(iy, self.field.shape[0] - 2), np.minimum(ix, self.field.shape[1] - 2)
        f = self.field
        v = (f[iy][:, ix] * (1 - wx) + f[iy][:, ix + 1] * wx) * (1 - wy)
        v += (f[iy + 1][:, ix] * (1 - wx) + f[iy + 1][:, ix + 1] * wx) * wy
        # a soft edge about one field cell wide
        return np.clip((v - self.threshold) * 4.0 + 0.5, 0.0, 1.0).astype(np.float32)

    def tile(self, ty: int, tx: int) -> np.ndarray:
        """Level-0 tile `(T, T, 3)` uint8 at tile row `ty`, column `tx` (pixels past the edge included)."""
        t = self.spec.tile
        a = self.alpha(ty * t, tx * t, t)[..., None]
        if not a.any():
            return np.broadcast_to(np.array(BACKGROUND, np.uint8), (t, t, 3)).copy()
        # a per-tile choice from the seed and the index only: any tile can be redrawn alone
        pick = np.random.default_rng((self.spec.seed, ty, tx)).integers(0, [N_SHEETS, t, t])
        sheet = self.sheets[pick[0]][pick[1] : pick[1] + t, pick[2] : pick[2] + t]
        if a.min() == 1.0:  # inside a tissue region: no blend needed
            return sheet.copy()
        bg = np.array(BACKGROUND, np.float32)
        return np.rint(bg + a * (sheet.astype(np.float32) - bg)).astype(np.uint8)


def pool2(tile: np.ndarray) -> np.ndarray:
    """`(2h, 2w, C)` uint8 -> `(h, w, C)` uint8, the rounded mean of each 2x2 block."""
    h, w = tile.shape[0] // 2, tile.shape[1] // 2
    s = tile[: 2 * h, : 2 * w].astype(np.uint16).reshape(h, 2, w, 2, -1).sum((1, 3))
    return ((s + 2) // 4).astype(np.uint8)


class _Scratch:
    """Pooled tiles `(T/2, T/2, 3)` of one level in tile order, in a raw file; read back as whole tiles."""

    def __init__(self, path: Path, grid: tuple[int, int], tile: int) -> None:
        self.path, self.grid, self.half = path, grid, tile // 2
        self.nbytes = self.half * self.half * 3
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def put(self, ty: int, tx: int, pooled: np.ndarray) -> None:
        os.pwrite(self.fd, np.ascontiguousarray(pooled).tobytes(), (ty * self.grid[1] + tx) * self.nbytes)

    def tile(self, ty: int, tx: int) -> np.ndarray:
        """The next level's tile `(T, T, 3)` at `(ty, tx)`: pooled tiles `(2ty.., 2tx..)`, 2x2."""
        h = self.half
        out = np.empty((2 * h, 2 * h, 3), np.uint8)
        out[...] = np.array(BACKGROUND, np.uint8)  # past the previous level's last tile: never shown
        for dy in range(2):
            for dx in range(2):
                sy, sx = 2 * ty + dy, 2 * tx + dx
                if sy < self.grid[0] and sx < self.grid[1]:
                    raw = os.pread(self.fd, self.nbytes, (sy * self.grid[1] + sx) * self.nbytes)
                    out[dy * h : (dy + 1) * h, dx * h : (dx + 1) * h] = np.frombuffer(raw, np.uint8).reshape(
                        h, h, 3
                    )
        return out

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


def write_big_slide(path: str | Path, spec: BigSlideSpec) -> Path:
    """Write `spec` as a pyramidal tiled TIFF at `path` (level 0 plus reduced SubIFDs); returns the path.

    Level 0 is `(size, size, 3)` uint8; level k is `(size // 2**k, size // 2**k, 3)`, the 2x2 rounded
    mean of level k-1. Memory holds a few tiles, the texture sheets and the coarse field, not a level.
    """
    import tifffile

    path = Path(path)
    if not path.parent.is_dir():
        raise OSError(f"{path.parent} is not a folder")
    shapes = spec.level_shapes()
    t = spec.tile
    painter = _Painter(spec)
    options = {
        "tile": (t, t),
        "dtype": np.uint8,
        "photometric": "rgb",
        "compression": spec.compression,
        "maxworkers": 1,  # tiles are drawn one at a time anyway; leave the cores to others
    }
    if spec.compression == "jpeg":
        options["compressionargs"] = {"level": spec.quality}
    scratch: list[_Scratch] = []
    try:
        with tifffile.TiffWriter(path, bigtiff=True) as tif:
            source = painter.tile
            for level, shape in enumerate(shapes):
                grid = (-(-shape[0] // t), -(-shape[1] // t))
                nxt = None
                if level + 1 < len(shapes):
                    nxt = _Scratch(path.with_name(f".{path.name}.level{level + 1}.raw"), grid, t)
                    scratch.append(nxt)
                extra = (
                    {
                        "subifds": len(shapes) - 1,
                        "resolution": (1e4 / spec.mpp, 1e4 / spec.mpp),
                        "resolutionunit": "CENTIMETER",
                    }
                    if level == 0
                    else {"subfiletype": 1}
                )
                tif.write(_tiles(source, grid, nxt), shape=(*shape, 3), **options, **extra)
                if nxt is not None:
                    source = nxt.tile
    finally:
        for s in scratch:
            s.close()
    return path


def _tiles(source, grid: tuple[int, int], pooled_to: _Scratch | None) -> Iterator[np.ndarray]:
    """Tiles of one level in row-major order, each also pooled into the next level's scratch file."""
    for ty in range(grid[0]):
        for tx in range(grid[1]):
            tile = source(ty, tx)
            if pooled_to is not None:
                pooled_to.put(ty, tx, pool2(tile))
            yield tile
