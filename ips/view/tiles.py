"""Tiles cut from a store's pyramid levels on demand, and an LRU cache of encoded tiles capped in bytes.

A 2D tile is `level[:, ty*T:(ty+1)*T, tx*T:(tx+1)*T]` (clipped at the level's edge); a 3D tile is the same
cut from one plane of the level, `axis` in z/y/x at `index` (in that level's voxels), its rows and columns
the two other axes in z, y, x order. Only the tile's region is read (the chunks it touches, through the
checked reader of `ips.view.reading`): memory is O(tile + cache cap), never a whole level.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ips.data.store import IpsStore
from ips.errors import StoreError
from ips.view.reading import MAX_READ_BYTES, LevelRegions

TILE_SIZE = 256
AXES = "zyx"
FORMATS = {"jpg": "image/jpeg", "png": "image/png"}
JPEG_QUALITY = 90


class TileError(ValueError):
    """A tile request outside the slide (bad level, axis, index or tile position): HTTP 404."""


@dataclass(frozen=True)
class Window:
    """Display range of a non-uint8 store: values in [lo, hi] map to 0..255 (one for the whole slide)."""

    lo: float
    hi: float


class SlideImage:
    """The pixels of one store as tiles: level shapes, downsamples, and `tile()`."""

    def __init__(self, store: IpsStore, tile_size: int = TILE_SIZE) -> None:
        self.store = store
        self.tile_size = tile_size
        self.dims = store.spatial_dims
        self.regions = LevelRegions(store)
        n = self.regions.n_levels
        self.shapes = [self.regions.shape(k) for k in range(n)]  # spatial (dims,)
        # from the source's level 0, the frame of heatmap coordinates (a store may begin lower down)
        self.downsamples = [tuple(float(v) for v in store.level_downsample(k)) for k in range(n)]
        self.dtype = np.dtype(self.regions.arrays[0].dtype)
        if self.regions.channels * tile_size**2 * self.dtype.itemsize > MAX_READ_BYTES:
            raise StoreError(f"{store.name}: {self.regions.channels} channels: a tile is too large to serve")
        self.window = self._window()

    def _window(self) -> Window | None:
        """uint8: none (pixels as stored); else the 0.5-99.5 percentiles of the smallest level (its
        middle part where it is large: a read stays under the cap)."""
        if self.dtype == np.uint8:
            return None
        shape = np.asarray(self.shapes[-1], dtype=np.int64)
        per_pixel = self.regions.channels * self.dtype.itemsize
        side = int((MAX_READ_BYTES // 4 // per_pixel) ** (1 / self.dims))
        size = np.minimum(shape, side)
        lo = (shape - size) // 2
        small = self.regions.read(len(self.shapes) - 1, tuple(lo.tolist()), tuple(size.tolist()))
        small = small.astype(np.float32)
        lo_v, hi_v = np.percentile(small, [0.5, 99.5]) if small.size else (0.0, 1.0)
        return Window(float(lo_v), float(hi_v) if hi_v > lo_v else float(lo_v) + 1.0)

    def plane_shape(self, level: int, axis: str | None) -> tuple[int, int]:
        """`(rows, cols)` of level `level` (2D) or of its planes across `axis` (3D)."""
        shape = self.shapes[level]
        if axis is None:
            return shape[0], shape[1]
        rest = [s for a, s in zip(AXES, shape) if a != axis]
        return rest[0], rest[1]

    def check(self, level: int, axis: str | None, index: int, ty: int, tx: int) -> None:
        """Raise TileError unless the request names a tile of this slide."""
        if not 0 <= level < len(self.shapes):
            raise TileError(f"level {level} not in 0..{len(self.shapes) - 1}")
        if (axis is None) != (self.dims == 2) or (axis is not None and axis not in AXES):
            raise TileError("2D slides take level/ty_tx tiles, volumes level/axis/index/ty_tx")
        if axis is not None and not 0 <= index < self.shapes[level][AXES.index(axis)]:
            raise TileError(f"index {index} outside the level's {axis} axis")
        rows, cols = self.plane_shape(level, axis)
        if not (0 <= ty < -(-rows // self.tile_size) and 0 <= tx < -(-cols // self.tile_size)):
            raise TileError(f"tile ({ty}, {tx}) outside level {level}")

    def region(self, level: int, axis: str | None, index: int, ty: int, tx: int) -> np.ndarray:
        """The tile's pixels as stored: `(C, h, w)` (h, w <= tile size at the level's edge)."""
        self.check(level, axis, index, ty, tx)
        t = self.tile_size
        rows, cols = self.plane_shape(level, axis)
        lo = [ty * t, tx * t]
        size = [min(t, rows - lo[0]), min(t, cols - lo[1])]
        if axis is not None:  # the plane's box: one voxel thick across `axis`
            lo.insert(AXES.index(axis), index)
            size.insert(AXES.index(axis), 1)
        box = self.regions.read(level, tuple(lo), tuple(size))
        return box if axis is None else box.squeeze(1 + AXES.index(axis))  # (C, plane rows, plane cols)

    def to_rgb(self, region: np.ndarray) -> np.ndarray:
        """`(C, h, w)` -> uint8 `(h, w, 3)`: 3 channels as RGB, else the channel mean in grey; non-uint8 by
        the slide's window."""
        img = region
        if img.shape[0] != 3:
            img = img.astype(np.float32).mean(axis=0, keepdims=True) if img.shape[0] > 1 else img
        if self.window is not None:
            img = (img.astype(np.float32) - self.window.lo) / (self.window.hi - self.window.lo) * 255.0
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8) if img.dtype != np.uint8 else img
        if img.shape[0] == 1:
            img = np.repeat(img, 3, axis=0)
        return np.ascontiguousarray(img.transpose(1, 2, 0))


def encode(image: np.ndarray, fmt: str) -> bytes:
    """uint8 `(h, w, 3|4)` -> JPEG or PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    pil = Image.fromarray(image)
    if fmt == "jpg":
        pil.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    elif fmt == "png":
        pil.save(buf, format="PNG", compress_level=1)
    else:
        raise TileError(f"unknown format {fmt!r}")
    return buf.getvalue()


class ByteLRU:
    """A thread-safe LRU cache of bytes whose total size stays <= `cap_bytes` (an item larger than the cap
    is not kept)."""

    def __init__(self, cap_bytes: int) -> None:
        self.cap = int(cap_bytes)
        self.size = 0
        self._items: OrderedDict[object, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: object) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: object, value: bytes) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.size -= len(old)
            if len(value) > self.cap:
                return
            self._items[key] = value
            self.size += len(value)
            while self.size > self.cap:
                _, dropped = self._items.popitem(last=False)
                self.size -= len(dropped)

    def __len__(self) -> int:
        return len(self._items)
