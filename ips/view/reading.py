"""The viewer's reads of a store: through the checked path that `ips predict` reads by, never a path of its own.

- `open_checked(location)`: a local store's folder holds only directories and regular files (no symlink,
  FIFO or device anywhere below its root), then `ips.data.store.open_store` (marker, recorded files);
- `LevelRegions`: any box of any pyramid level, read by `ips.data.zarr_source.RegionReader` (the chunk
  reader that `ZarrPatchSource` reads patches with, and the store's record of written chunks): a lost or
  damaged chunk is a `StoreError`, never background; the viewer adds its bounds on what one read may
  cost.
- `check_tree(root)`: the folder check, also for a heatmap's `scores.zarr`.

Stores may come from others: the folder check keeps every read inside the stores the viewer was started
with, and reads are bounded in size (`MAX_READ_BYTES`).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ips.data.store import IpsStore, StoreLocation, is_local, open_store
from ips.data.zarr_source import RegionReader
from ips.errors import StoreError
from ips.format import location as loc

MAX_READ_BYTES = 64 << 20  # one read of the viewer (a tile, a gallery patch, a window sample)
MAX_LEVELS = 64
MAX_CHUNKS_PER_SHARD = 1 << 20  # a shard index of 16 MiB


def check_tree(root: Path, name: str) -> None:
    """Raise StoreError (naming `name`, not the path) unless everything below `root` is a directory or a
    regular file: a symlink could point anywhere (a file outside the store read as chunk bytes), a FIFO
    would block its reader. `root` itself may be a link (the user's own path to the store)."""
    base = Path(os.path.realpath(root))
    todo = [base]
    while todo:
        folder = todo.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            raise StoreError(f"{name}: cannot list {folder.relative_to(base)} ({e.strerror})") from None
        for entry in entries:
            try:  # the types come from the listing (d_type): no system call per file
                if entry.is_dir(follow_symlinks=False):
                    todo.append(Path(entry.path))
                    continue
                if entry.is_file(follow_symlinks=False):
                    continue
                kind = "a symlink" if entry.is_symlink() else "not a regular file"
            except OSError:  # gone since the listing: nothing to read there
                continue
            rel = Path(entry.path).relative_to(base).as_posix()
            raise StoreError(f"{name}: {rel!r} is {kind}; refused (a store's files must lie inside it)")


def open_checked(location: StoreLocation, name: str) -> IpsStore:
    """`open_store(location)` after the folder check (local stores; `name` is the slide's name in
    messages). Raises StoreError."""
    if isinstance(location, (str, Path)) and is_local(location):
        path = loc.local_path(location)
        if not path.is_dir():
            raise StoreError(f"{name}: store does not exist (deleted or moved since `ips view` started?)")
        check_tree(path, name)
    try:
        return open_store(location)
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - zarr's own errors for a root zarr.json that does not parse
        raise StoreError(
            f"{name}: its metadata (zarr.json) does not load ({type(e).__name__}: {e})"
        ) from None


class LevelRegions:
    """Boxes of a store's pyramid levels: `read(level, lo, size)` -> `(C, *size)` in the store's dtype.

    One `RegionReader` per level, made on first use (its shard-index cache is kept); thread-safe."""

    def __init__(self, store: IpsStore) -> None:
        self.store = store
        self.n_levels = len(store.level_downsamples) or 1
        if self.n_levels > MAX_LEVELS:
            raise StoreError(f"{store.name}: {self.n_levels} pyramid levels (at most {MAX_LEVELS})")
        self.arrays = [_level(store, k) for k in range(self.n_levels)]
        for k, array in enumerate(self.arrays):
            _check_level(store.name, k, array, store.spatial_dims)
        self._regions: dict[int, RegionReader] = {}
        self._lock = threading.Lock()

    def shape(self, level: int) -> tuple[int, ...]:
        """Spatial shape `(dims,)` of level `level`."""
        return tuple(int(s) for s in self.arrays[level].shape[1:])

    @property
    def channels(self) -> int:
        return int(self.arrays[0].shape[0])

    def _region(self, level: int) -> RegionReader:
        with self._lock:
            if level not in self._regions:
                self._regions[level] = RegionReader(self.store, level)
            return self._regions[level]

    def read(self, level: int, lo: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
        """The box `[lo, lo + size)` (spatial `(dims,)`, inside the level) of every channel: `(C, *size)`.
        Raises StoreError for lost or damaged chunks and for a box over `MAX_READ_BYTES`."""
        array = self.arrays[level]
        full = (int(array.shape[0]), *(int(s) for s in size))
        nbytes = int(np.prod(full)) * np.dtype(array.dtype).itemsize
        if nbytes > MAX_READ_BYTES:
            raise StoreError(f"{self.store.name}: a read of {full} is over {MAX_READ_BYTES >> 20} MiB")
        try:
            return self._region(level).read(tuple(lo), tuple(size))
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - a codec or metadata failure is damage, named with the store
            raise StoreError(
                f"{self.store.name}: a read of level {level} failed ({type(e).__name__}: {e})"
            ) from None


def _check_level(name: str, level: int, array: Any, dims: int) -> None:
    """Refuse a level the viewer cannot read within bounds: other axes, a non-numeric dtype, chunks over
    `MAX_READ_BYTES` (each is decoded whole) or shards of more than `MAX_CHUNKS_PER_SHARD` chunks."""
    where = f"{name}: level {level}"
    if array.ndim != dims + 1:
        raise StoreError(f"{where} has {array.ndim} axes, expected {dims + 1}")
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "iuf":
        raise StoreError(f"{where} has dtype {dtype}: not pixels")
    chunk_bytes = int(np.prod(array.chunks, dtype=np.float64)) * dtype.itemsize
    if chunk_bytes > MAX_READ_BYTES:
        raise StoreError(f"{where}: chunks {tuple(array.chunks)} are over {MAX_READ_BYTES >> 20} MiB each")
    shards = array.shards or array.chunks
    per_shard = int(np.prod([s // c for s, c in zip(shards, array.chunks)], dtype=np.float64))
    if per_shard > MAX_CHUNKS_PER_SHARD:
        raise StoreError(f"{where}: shards of {per_shard} chunks (at most {MAX_CHUNKS_PER_SHARD})")


def _level(store: IpsStore, level: int) -> Any:
    """`store.level(level)`, with metadata that zarr cannot load as a StoreError naming the array."""
    try:
        return store.level(level)
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - zarr's own errors for a zarr.json that does not parse or fit
        raise StoreError(
            f"{store.name}: array '{level}': its metadata (zarr.json) does not load ({type(e).__name__}: {e})"
        ) from None
