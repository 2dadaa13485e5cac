"""Writing a store: the partial folder, pyramid arrays, small arrays, the lock; the marker and the commit
are the store contract's (`ips.format.store.commit`).

Codec: zstd (level 1) by default, a zarr v3 core codec, so every zarr v3 implementation reads the store;
`--codec blosc-lz4` (clevel 5, byte shuffle, also core) gives a larger store that decodes faster
(docs/FORMAT.md "Chunks" and docs/BENCHMARKS.md "Store size and codecs" have the measured sizes and
speeds). Stores written with either open the same way: the reader takes the codec from the metadata.

Chunks: every level has the same chunk shape, the patch size (or `gcd(patch, stride)` when patches
overlap, so a patch covers whole chunks), enlarged to a multiple of at least 64 (2D) / 32 (3D) pixels
for tiny patches; shards hold `shard_chunks` chunks per axis (8 x 8 in 2D, 4 x 4 x 4 in 3D). Chunks that
equal the fill value (`background`) are not written.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BloscCodec, TransposeCodec, ZstdCodec

from data_prep.options import CODECS, LOSSY_CODECS
from ips.errors import PrepError
from ips.format import image_codecs
from ips.format.checksums import bytes_record
from ips.format.location import is_remote
from ips.format.lockfile import read_holder, write_holder
from ips.format.names import COMPLETE_MARKER, LOCK_SUFFIX
from ips.format.sharding import MISSING, ShardLayout
from ips.format.store import commit, read_marker, remove_stale, seal, store_paths
from ips.format.store import is_complete as is_complete

MIN_CHUNK = {2: 64, 3: 32}
ARRAY_CONFIG = {"write_empty_chunks": False}  # background chunks stay unwritten


def make_compressor(name: str, level: int | None = None) -> Any:
    """The zarr v3 compressor for a lossless codec name in CODECS (None for "none"), or for a lossy one
    (LOSSY_CODECS) its image codec, which `StoreWriter.image_array` places as the serializer."""
    if name in LOSSY_CODECS:
        return image_codecs.make(name, level)
    if name == "zstd":
        return ZstdCodec(level=1 if level is None else level)
    if name == "blosc-lz4":  # byte shuffle: a no-op for uint8, groups bytes of uint16/float volumes
        return BloscCodec(cname="lz4", clevel=5 if level is None else level, shuffle="shuffle")
    if name == "none":
        return None
    raise ValueError(f"unknown codec {name!r}; choose from {CODECS}")


def chunk_layout(
    patch: tuple[int, ...], stride: tuple[int, ...], shard_chunks: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Spatial `(chunk, shard)` shapes for patches of `patch` pixels placed every `stride` pixels."""
    dims = len(patch)
    chunk = []
    for p, s in zip(patch, stride):
        base = math.gcd(p, s)
        chunk.append(base * math.ceil(MIN_CHUNK[dims] / base))
    return tuple(chunk), tuple(c * shard_chunks for c in chunk)


def iter_blocks(
    shape: tuple[int, ...], block: tuple[int, ...]
) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """`(start, size)` of the blocks tiling `shape` in row-major order (edge blocks are clipped)."""
    ranges = [range(0, n, b) for n, b in zip(shape, block)]
    for start in np.ndindex(*(len(r) for r in ranges)):
        s = tuple(r[i] for r, i in zip(ranges, start))
        yield s, tuple(min(b, n - o) for o, b, n in zip(s, block, shape))


def run_bounded(
    tasks: Iterator[Callable[[], None]], threads: int, on_done: Callable[[], None] | None = None
) -> None:
    """Run callables on `threads` threads with at most `2 * threads` in flight (bounded memory);
    the first exception is raised after the in-flight tasks settle."""
    if threads <= 1:
        for task in tasks:
            task()
            if on_done:
                on_done()
        return
    with ThreadPoolExecutor(threads) as pool:
        pending: list[Future[None]] = []
        try:
            for task in tasks:
                pending.append(pool.submit(task))
                if len(pending) >= 2 * threads:
                    pending.pop(0).result()
                    if on_done:
                        on_done()
            for fut in pending:
                fut.result()
                if on_done:
                    on_done()
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


class ShardEncoder:
    """Writes whole shards of one array straight to disk, in the array's `ips.format.sharding` layout.

    zarr-python's write path runs its async codec pipeline per inner chunk (a multiple of the codec's
    own cost); a conversion writes every shard exactly once and whole, so it encodes here instead: each
    inner chunk (padded with the fill value at the array's edge), chunks equal to the fill value left
    out. zarr reads the result (tests/test_sharding.py). `records` gets `[size, crc32c]` per written key
    (relative to the array's folder) for the completion marker.
    """

    def __init__(self, array: zarr.Array, folder: Path, records: dict[str, list[int]] | None = None) -> None:
        self.layout = ShardLayout.of(array)
        if not self.layout.sharded:
            raise ValueError(f"not a sharded array: {array.metadata.to_dict()['codecs']}")
        self._folder = folder
        self.records: dict[str, list[int]] = {} if records is None else records
        lay = self.layout
        assert lay.shard_shape is not None
        self.shape, self.chunk, self.shard = lay.shape[1:], lay.chunk_shape[1:], lay.shard_shape[1:]
        self.fill_value = lay.fill_value
        self._open: dict[tuple[int, ...], _Scratch] = {}  # shard -> its encoded chunks so far
        self._lock = threading.Lock()

    def write(self, start: tuple[int, ...], block: np.ndarray) -> None:
        """Write the shard whose region starts at spatial `start` (shard-aligned); `block` `(C, *size)`
        is that shard clipped to the array."""
        lay = self.layout
        assert lay.shard_shape is not None
        full = (0, *start)
        if any(o % s for o, s in zip(full, lay.shard_shape)):
            raise ValueError(f"region {start} is not shard-aligned ({lay.shard_shape})")
        idx = tuple(o // s for o, s in zip(full, lay.shard_shape))
        if block.shape == lay.shard_shape and block.dtype == lay.stored_dtype:
            shard = block  # an interior shard: no padding copy
        else:
            shard = np.full(lay.shard_shape, lay.fill_value, dtype=lay.stored_dtype)
            shard[tuple(slice(0, n) for n in block.shape)] = block
        fill = lay.fill_value

        def chunks() -> Iterator[tuple[tuple[int, ...], bytes]]:
            for cidx in np.ndindex(*lay.chunks_per_shard):
                chunk = shard[tuple(slice(i * c, (i + 1) * c) for i, c in zip(cidx, lay.chunk_shape))]
                # background (left out, the fill value stands for it); the first pixel settles most chunks
                if chunk.flat[0] == fill and (chunk == fill).all():
                    continue
                yield cidx, lay.encode_chunk(chunk)

        data = lay.encode_shard(chunks())
        key = lay.key(idx)
        path = self._folder / key
        if data is None:
            self._remove(path)
            self.records.pop(key, None)
            return
        self._put(path, data)
        self.records[key] = bytes_record(data)

    def put_chunk(self, shard: tuple[int, ...], pos: tuple[int, ...], chunk: np.ndarray) -> None:
        """One inner chunk `(C, *chunk)` (edge chunks padded with the fill value) of the shard at spatial
        grid index `shard`, at spatial chunk position `pos` inside it, written whole by `close_shard`.
        It is encoded now and kept on an unnamed scratch file, not in memory; a background chunk is left
        out. Thread-safe."""
        lay = self.layout
        if chunk.flat[0] == lay.fill_value and (chunk == lay.fill_value).all():
            return
        data = lay.encode_chunk(chunk)
        with self._lock:
            scratch = self._open.get(shard)
            if scratch is None:
                scratch = self._open[shard] = _Scratch(self._scratch_dir())
            scratch.append((0, *pos), data)

    def close_shard(self, shard: tuple[int, ...]) -> None:
        """Write the shard at spatial grid index `shard` from the chunks `put_chunk` gave it: the same
        bytes as `write` of its pixels (chunks in C order, then the index), streamed from the scratch
        file; no file when every chunk was background."""
        lay = self.layout
        with self._lock:
            scratch = self._open.pop(shard, None)
        key = lay.key((0, *shard))
        path = self._folder / key
        if scratch is None:
            self._remove(path)
            self.records.pop(key, None)
            return
        try:
            index = np.full((*lay.chunks_per_shard, 2), MISSING, dtype="<u8")
            offset = 0 if lay.index_at_end else lay.index_nbytes
            for pos in sorted(scratch.at):  # C order, as `encode_shard`
                index[pos] = (offset, scratch.at[pos][1])
                offset += scratch.at[pos][1]
            head = [lay.encode_index(index)]
            body = scratch.chunks()
            self.records[key] = self._put_parts(
                path, itertools.chain(body, head) if lay.index_at_end else itertools.chain(head, body)
            )
        finally:
            scratch.close()

    def _scratch_dir(self) -> Path | None:
        """Where scratch files go: the array's folder (the store's disk)."""
        return self._folder

    def _put_parts(self, path: Path, parts: Iterable[bytes]) -> list[int]:
        """Write `parts` one after the other as the file `path`; returns its `[size, crc32c]`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        crc, size = 0, 0
        with open(path, "wb") as f:
            for part in parts:
                f.write(part)
                crc = google_crc32c.extend(crc, part)
                size += len(part)
        return [size, int(crc)]

    @staticmethod
    def _remove(path: Path) -> None:
        path.unlink(missing_ok=True)

    @staticmethod
    def _put(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


class _Scratch:
    """Encoded chunks of one shard, in the order they came, on an unnamed temporary file (gone when
    closed, or when the process dies); `chunks()` reads them back one at a time in C order."""

    def __init__(self, folder: Path | None) -> None:
        self._file = tempfile.TemporaryFile(dir=folder)
        self.at: dict[tuple[int, ...], tuple[int, int]] = {}  # chunk position -> (offset, nbytes)
        self._size = 0

    def append(self, pos: tuple[int, ...], data: bytes) -> None:
        self._file.write(data)
        self.at[pos] = (self._size, len(data))
        self._size += len(data)

    def chunks(self) -> Iterator[bytes]:
        self._file.flush()
        fd = self._file.fileno()
        for pos in sorted(self.at):
            offset, n = self.at[pos]
            yield os.pread(fd, n, offset)

    def close(self) -> None:
        self._file.close()


def reseal(store: str | Path, arrays: list[str] | None = None) -> None:
    """Record the current bytes of a complete store's arrays (all, or those named) in its marker: for
    tools that change a store after `ips prep` (benchmarks filling pixels in, a grid added)."""
    marker = read_marker(store)
    if marker is None:
        raise PrepError(f"{store}: not a complete store (no {COMPLETE_MARKER})")
    if arrays is None:
        seal(store, marker.grids, known=marker.arrays)
    else:
        seal(store, marker.grids, only=arrays)


class StoreLock:
    """An exclusive lock on one output store, `DIR/.<slide_id>.zarr.lock` (fcntl.flock), held while a
    prep reads, converts or extends it, so two preps of the same output never interleave. The holder's
    pid and host are written into the file for the other's message. The file is removed on release
    (and on acquiring, the locked file is checked to still be the one at the path)."""

    def __init__(self, out_dir: str | Path, slide_id: str) -> None:
        self.path = Path(out_dir) / f".{slide_id}.zarr{LOCK_SUFFIX}"
        self.store = Path(out_dir) / f"{slide_id}.zarr"
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = read_holder(fd)
                os.close(fd)
                raise PrepError(
                    f"{self.store}: another ips prep ({holder}) is writing this store "
                    f"(lock {self.path}); wait for it to finish"
                ) from None
            try:  # the previous holder may have removed the file (and another made a new one) meanwhile
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        write_holder(fd, f"pid {os.getpid()} on {socket.gethostname()}")
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


class StoreWriter:
    """The life of one store: created at `DIR/.<id>.zarr.partial-<pid>`, made complete by `commit`
    (the marker written inside, then one rename to `DIR/<id>.zarr`). `abort` removes the partial folder.
    The caller holds the store's `StoreLock` throughout."""

    def __init__(self, out_dir: str | Path, slide_id: str) -> None:
        self.out_dir, self.slide_id = Path(out_dir), slide_id
        self.final, self.partial = store_paths(out_dir, slide_id)
        self.group: zarr.Group | None = None
        self.records: dict[str, dict[str, list[int]]] = {}  # array -> key -> [size, crc32c], as written
        self._staged: list[Path] = []

    def begin(self) -> zarr.Group:
        """Create a fresh partial store (stale ones from killed runs are removed first)."""
        self.final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.out_dir, self.slide_id)
        self.group = zarr.create_group(store=str(self.partial), zarr_format=3)
        return self.group

    def encoder(self, name: str, array: zarr.Array) -> ShardEncoder:
        """The shard encoder of pyramid array `name`; what it writes is recorded for the marker."""
        return ShardEncoder(array, self.partial / name, self.records.setdefault(name, {}))

    def image_array(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: np.dtype,
        chunks: tuple[int, ...],
        shards: tuple[int, ...],
        fill_value: float,
        compressor: Any,
    ) -> zarr.Array:
        """A pyramid level `(C, *spatial)`, chunks `(C, *chunks)` inside shards `(C, *shards)`. An image
        codec (`compressor` from a lossy `make_compressor`) sees each chunk as `(y, x, C)`."""
        assert self.group is not None
        image = isinstance(compressor, image_codecs.ImageCodec)
        codecs: dict[str, Any] = (
            {
                "filters": [TransposeCodec(order=image_codecs.IMAGE_ORDER)],
                "serializer": compressor,
                "compressors": None,
            }
            if image
            else {"compressors": compressor}
        )
        dims = ["c", "z", "y", "x"][-len(shape) :] if len(shape) == 4 else ["c", "y", "x"]
        spatial = shape[1:]
        chunk = tuple(min(c, n) for c, n in zip(chunks, spatial))
        # a shard is a whole number of chunks and need not exceed the array (rounded up to chunks)
        shard = tuple(min(s, math.ceil(n / c) * c) for s, c, n in zip(shards, chunk, spatial))
        return self.group.create_array(
            name=name,
            shape=shape,
            dtype=dtype,
            chunks=(shape[0], *chunk),
            shards=(shape[0], *shard),
            **codecs,
            fill_value=fill_value,
            dimension_names=dims,
            config=ARRAY_CONFIG,
        )

    def small_array(
        self,
        name: str,
        data: np.ndarray,
        *,
        chunk_rows: int = 1 << 18,
        dimension_names: list[str] | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> zarr.Array:
        """A small array written in one go (mask, coords, tissue), zstd-compressed."""
        assert self.group is not None
        chunks = tuple(max(1, min(n, chunk_rows if i == 0 else n)) for i, n in enumerate(data.shape))
        arr = self.group.create_array(
            name=name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunks,
            compressors=ZstdCodec(level=3),
            fill_value=0,
            dimension_names=dimension_names,
            attributes=attributes or {},
        )
        if data.size:
            arr[...] = data
        return arr

    def commit(self, grids: list[str]) -> Path:
        """Make the store complete (`ips.format.store.commit`): record every array's written keys, sizes,
        checksums and metadata in the marker (written inside the partial store), then rename it into
        place (replacing an old one)."""
        return commit(self.partial, self.final, grids, self.records)

    def staging(self, name: str) -> Path:
        """Where to write `DIR/<name>` (a file beside the store, e.g. its thumbnail) before `publish`."""
        staged = self.final.with_name(f".{name}.new")
        self._staged.append(staged)
        return staged

    def publish(self, staged: Path, name: str) -> None:
        """Put a staged file in place as `DIR/<name>` (after `commit`)."""
        os.replace(staged, self.final.with_name(name))

    def abort(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
        for staged in self._staged:
            staged.unlink(missing_ok=True)


def store_lock(out_dir: str | Path, slide_id: str) -> Any:
    """The lock of `out_dir/<slide_id>.zarr` while it is written: a `StoreLock` on a local disk; none on
    object storage, which has no flock (one writer per store, `data_prep.remote`)."""
    return contextlib.nullcontext() if is_remote(out_dir) else StoreLock(out_dir, slide_id)
