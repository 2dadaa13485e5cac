"""Tiles cut from a store's pyramid levels on demand, and an LRU cache of encoded tiles capped in bytes.

A 2D tile is `level[:, ty*T:(ty+1)*T, tx*T:(tx+1)*T]` (clipped at the level's edge); a 3D tile is the same
cut from one plane of the level, `axis` in z/y/x at `index` (in that level's voxels), its rows and columns
the two other axes in z, y, x order. Only the tile's region is read (the zarr chunks it touches): memory is
O(tile + cache cap), never a whole level.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ips.data.store import IpsStore

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
        n = len(store.level_downsamples) or 1
        self.shapes = [tuple(int(s) for s in store.level(k).shape[1:]) for k in range(n)]  # spatial (dims,)
        # from the source's level 0, the frame of heatmap coordinates (a store may begin lower down)
        self.downsamples = [tuple(float(v) for v in store.level_downsample(k)) for k in range(n)]
        self.dtype = np.dtype(store.level(0).dtype)
        self.window = self._window()

    def _window(self) -> Window | None:
        """uint8: none (pixels as stored); else the 0.5-99.5 percentiles of the smallest level."""
        if self.dtype == np.uint8:
            return None
        small = np.asarray(self.store.level(len(self.shapes) - 1)[...], dtype=np.float32)
        lo, hi = np.percentile(small, [0.5, 99.5]) if small.size else (0.0, 1.0)
        return Window(float(lo), float(hi) if hi > lo else float(lo) + 1.0)

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
        rows = slice(ty * t, (ty + 1) * t)
        cols = slice(tx * t, (tx + 1) * t)
        array = self.store.level(level)
        if axis is None:
            return np.asarray(array[:, rows, cols])
        key: list[slice | int] = [slice(None), rows, cols]
        key.insert(1 + AXES.index(axis), index)  # (C, plane rows, plane cols)
        return np.asarray(array[tuple(key)])

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
