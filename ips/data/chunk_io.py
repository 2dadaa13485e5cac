"""Patch reads assembled from whole chunks of a zarr v3 array, fetched straight from their shards.

A patch read is: find the chunks the patch covers in their shards' indexes, fetch their bytes, decode
them, copy the covered parts. zarr's generic path does the same with more work per chunk (a shard-index
read per request, one awaited store read per chunk, a copy through its output buffer), which costs more
than decoding a small chunk. Here each shard's index is read once and cached, the byte ranges wanted
from one shard are coalesced into few reads, each chunk is decoded once per call however many patches
share it, and a chunk that is exactly one patch is decoded straight into the output. numcodecs releases
the GIL while decoding (so do imagecodecs' JPEG, JPEG XL and WebP decoders), so shards are handled in
parallel by a thread pool.

The byte layout (keys, shard index, codecs) is `ips.format.sharding.ShardLayout`, shared with the
writer; `ChunkReader.for_array` returns None for a layout it does not handle, and callers fall back to
zarr's own reads. Local stores are read with plain `os.pread`; other stores through the zarr store's
(async) `get` with byte ranges, run on zarr's event loop (`zarr.core.sync.sync`: zarr has no public
synchronous byte-range read).

Integrity: given the store's record of written keys (`ips.format.checksums`, from the completion
marker), a shard that is absent but recorded was lost, not background, and a key the record does not
hold is background without a read (whatever a file there holds). A local chunk file that is a symbolic
link, or lies in a folder resolving outside the store, is refused (`ips.format.location.RootGuard`). Every problem with a chunk's
bytes (a lost shard, one shorter than its index says, a bad index checksum, a chunk that does not
decode) raises `StoreError` naming the store, the array and the chunk.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import OrderedDict
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numcodecs
import numpy as np
import zarr
from numcodecs import blosc as _blosc
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from ips.errors import StoreError
from ips.format.location import OutsideStore, RootGuard
from ips.format.sharding import MISSING, CorruptShard, ShardLayout, UnsupportedLayout

# byte ranges of one shard closer than this are fetched as one read: on local disk a pread is cheap and
# reading gaps is not (measured: random-order pass 0.18 s at 16 KiB, 0.26 s at 1 MiB); a remote request
# costs a round trip, worth a larger gap
COALESCE_GAP_LOCAL = 16 << 10
COALESCE_GAP_REMOTE = 1 << 20
INDEX_CACHE_SHARDS = 4096  # cached shard indexes: 4096 * 16 B * chunks per shard (4 MiB at 64 chunks)


def _split_by(labels: np.ndarray, n: int) -> list[np.ndarray]:
    """Positions of each label 0..n-1 in `labels` `(m,)`: a list of n int arrays."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(n + 1))
    return [order[bounds[i] : bounds[i + 1]] for i in range(n)]


@dataclass
class _Plan:
    """One `read_boxes` call: unique chunks `(m, ndim)`, the boxes each serves, and where they go.

    The (chunk, box) pairs are grouped by chunk: chunk i serves pairs `bounds[i]:bounds[i + 1]`. Their
    copy geometry is computed for all pairs at once (vectorised) and kept as Python tuples, so the
    per-pair work left in the copy loop is one slice assignment.
    """

    chunks: np.ndarray
    bounds: list[int]
    direct_slot: np.ndarray  # per chunk: output slot when the chunk is exactly one box, else -1
    edge: np.ndarray  # per chunk: reaches past the array's end
    out: np.ndarray
    pair_slot: list[int]  # per pair: output slot of its box
    pair_src: list[tuple[slice, ...]]  # per pair: the box's part inside the chunk, in chunk coordinates
    pair_dst: list[tuple[slice, ...] | None]  # per pair: the same part in box coordinates (None: no overlap)


def _copy_geometry(
    lo: np.ndarray,
    hi: np.ndarray,
    user_order: np.ndarray,
    pc_lo: np.ndarray,
    chunk: np.ndarray,
    shape: np.ndarray,
) -> tuple[list[tuple[slice, ...]], list[tuple[slice, ...] | None]]:
    """Per (chunk, box) pair: the box's part inside the chunk, in chunk and in box coordinates (None where
    they do not overlap); computed for all pairs at once. `pc_lo`: each pair's chunk origin `(pairs, ndim)`."""
    b_lo = lo[user_order]
    a = np.maximum(b_lo, pc_lo)
    z = np.minimum(np.minimum(hi[user_order], pc_lo + chunk), shape)
    overlap = np.all(z > a, axis=1).tolist()
    src_lo, src_hi = (a - pc_lo).tolist(), (z - pc_lo).tolist()
    dst_lo, dst_hi = (a - b_lo).tolist(), (z - b_lo).tolist()
    pair_src = [tuple(map(slice, x, y)) for x, y in zip(src_lo, src_hi)]
    pair_dst = [tuple(map(slice, x, y)) if ok else None for x, y, ok in zip(dst_lo, dst_hi, overlap)]
    return pair_src, pair_dst


class ChunkReader:
    """Reads boxes (patches) of one zarr v3 array by whole chunks.

    Build with `ChunkReader.for_array(array, pad_value, written=..., name=...)`. `read_boxes(lo, size,
    out, slots, executor)` fills `out[slots[j]]` `(*size)` with the array's box `[lo[j], lo[j] + size)`
    (all axes, channel included). Unwritten chunks read as the array's fill value; the part of a box
    outside the array is `pad_value`. `written`: `{key: [size, crc32c]}` of the shards (or chunks) the
    store's marker records (None: unknown, an absent key reads as the fill value); `name`: the store's
    name for messages.
    """

    def __init__(
        self,
        array: zarr.Array,
        layout: ShardLayout,
        pad_value: Any,
        written: dict[str, list[int]] | None = None,
        name: str = "",
    ) -> None:
        self.layout = layout
        self.shape = np.asarray(layout.shape, dtype=np.int64)
        self.chunk_shape = layout.chunk_shape
        self._chunk = np.asarray(self.chunk_shape, dtype=np.int64)
        codec = self.codec = layout.codec
        # blosc straight into the output: half the per-call cost of `Blosc.decode(out=)`, which checks
        # and wraps its buffers first (6 vs 12 us for a 64 x 64 x 3 chunk), for the same bytes
        self._decode_into = (
            (lambda data, dest: _blosc.decompress(data, dest))
            if isinstance(codec, numcodecs.Blosc)
            else (lambda data, dest: codec.decode(data, out=dest))
        )
        self.dtype = layout.dtype
        self.stored_dtype = layout.stored_dtype
        self.fill_value = layout.fill_value
        self.pad_value = pad_value
        self._store = array.store_path.store
        self._prefix = array.store_path.path
        self._root = str(self._store.root) if isinstance(self._store, LocalStore) else None
        # no reads outside the store: a chunk file that is a link, or lies outside the root, is refused
        self._guard = RootGuard(self._root) if self._root is not None else None
        self._gap = COALESCE_GAP_LOCAL if self._root is not None else COALESCE_GAP_REMOTE
        self.sharded = layout.sharded
        self._per_shard = np.asarray(layout.chunks_per_shard, dtype=np.int64)
        self._written = written
        self._where = f"{name}: array {self._prefix!r}"
        self._index_cache: OrderedDict[tuple[int, ...], np.ndarray | None] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def for_array(
        cls,
        array: zarr.Array,
        pad_value: Any = None,
        *,
        written: dict[str, list[int]] | None = None,
        name: str = "",
    ) -> ChunkReader | None:
        """A reader for `array`, or None if its layout is not one this module handles."""
        try:
            layout = ShardLayout.of(array)
        except (UnsupportedLayout, KeyError, TypeError, AttributeError):
            return None
        return cls(array, layout, layout.fill_value if pad_value is None else pad_value, written, name)

    # --- bytes ---------------------------------------------------------------------------------------

    def _damaged(self, key: str, what: str, chunk: tuple[int, ...] | None = None) -> StoreError:
        if self.sharded:
            at = f"chunk {chunk} in shard {key!r}" if chunk is not None else f"shard {key!r}"
        else:
            at = f"chunk {key!r}"
        return StoreError(
            f"{self._where} {at}: {what}; run `ips verify`, rebuild with `ips prep --overwrite`"
        )

    def _fetch(
        self, key: str, ranges: list[tuple[int, int]] | None = None, suffix: int | None = None
    ) -> tuple[list[bytes], int | None] | None:
        """Byte ranges `[(start, end)]` of `key`, its last `suffix` bytes, or (neither) all of it, and the
        file's size where known; None if the key is absent (and not recorded as written: then it is
        lost, a StoreError). A range cut short by the end of the file raises StoreError (truncated)."""
        rel = key
        if self._written is not None and rel not in self._written:
            return None  # not written (background): the marker says so, whatever a file there holds
        key = f"{self._prefix}/{rel}" if self._prefix else rel
        size: int | None = None
        if self._guard is not None:  # local disk: plain preads, no event-loop round trip
            try:
                fd = self._guard.open(os.path.join(self._root or "", key))
            except FileNotFoundError:
                return self._absent(rel)
            except OutsideStore as e:
                raise self._damaged(rel, e.reason) from None
            try:
                if ranges is not None:
                    out = [os.pread(fd, b - a, a) for a, b in ranges]
                else:
                    size = os.fstat(fd).st_size
                    n = size if suffix is None else min(suffix, size)
                    out = [os.pread(fd, n, size - n)]
            finally:
                os.close(fd)
        else:
            got = self._fetch_remote(key, rel, ranges, suffix)
            if got is None:
                return self._absent(rel)
            out, size = got
        if ranges is not None and any(len(o) != b - a for o, (a, b) in zip(out, ranges)):
            raise self._damaged(rel, "the file is shorter than its index says (truncated)")
        return out, size

    def _fetch_remote(
        self, key: str, rel: str, ranges: list[tuple[int, int]] | None, suffix: int | None
    ) -> tuple[list[bytes], int | None] | None:
        """`_fetch` through the zarr store (object storage): every range of one call in one batch
        (`get_partial_values`: concurrent requests, merged further by obstore); a suffix becomes a
        bounded range when the marker records the object's size (some HTTP servers lack suffixes)."""
        record = self._written.get(rel) if self._written is not None else None
        size = record[0] if record is not None else None
        if ranges is None and suffix is not None and size is not None:
            ranges = [(max(0, size - suffix), size)]
        requests = (
            [None]
            if ranges is None and suffix is None
            else [SuffixByteRequest(suffix)]
            if ranges is None
            else [RangeByteRequest(a, b) for a, b in ranges]
        )
        proto = default_buffer_prototype()
        try:
            if len(requests) == 1:
                bufs = [sync(self._store.get(key, prototype=proto, byte_range=requests[0]))]
            else:
                bufs = sync(self._store.get_partial_values(proto, [(key, r) for r in requests]))
        except FileNotFoundError:
            return None
        if any(b is None for b in bufs):
            return None
        out = [b.to_bytes() for b in bufs]
        if ranges is not None and any(len(o) != b - a for o, (a, b) in zip(out, ranges)):
            raise self._damaged(rel, "the object is shorter than recorded (truncated)")
        if size is None and ranges is None and suffix is None:
            size = len(out[0])
        return out, size

    def _absent(self, key: str) -> None:
        if self._written is not None and key in self._written:
            raise self._damaged(key, "missing (written by ips prep, since lost)")
        return None

    def _shard_index(self, shard: tuple[int, ...]) -> np.ndarray | None:
        """uint64 `(*chunks_per_shard, 2)` (offset, nbytes) of `shard`; None if it is not written."""
        with self._lock:
            if shard in self._index_cache:
                self._index_cache.move_to_end(shard)
                return self._index_cache[shard]
        lay = self.layout
        key = lay.key(shard)
        got = (
            self._fetch(key, suffix=lay.index_nbytes)
            if lay.index_at_end
            else self._fetch(key, ranges=[(0, lay.index_nbytes)])
        )
        index = None if got is None else self._index_from(key, got[0][0], got[1])
        self._cache_index(shard, index)
        return index

    def _index_from(self, key: str, raw: bytes, size: int | None) -> np.ndarray:
        """The decoded index of shard `key` (of `size` bytes, where known), checked against the record."""
        record = self._written.get(key) if self._written is not None else None
        if record is not None and size is not None and size != record[0]:
            raise self._damaged(key, f"{size} bytes, {record[0]} written (truncated or changed)")
        try:
            index = self.layout.decode_index(raw)
            if size is not None:
                self.layout.check_index(index, size)
        except CorruptShard as e:
            raise self._damaged(key, str(e)) from None
        return index

    def _cache_index(self, shard: tuple[int, ...], index: np.ndarray | None) -> None:
        with self._lock:
            self._index_cache[shard] = index
            if len(self._index_cache) > INDEX_CACHE_SHARDS:
                self._index_cache.popitem(last=False)

    def _prefetch_indexes(self, shards: list[tuple[int, ...]]) -> None:
        """Object storage: the indexes of `shards` not cached yet, in one batch of concurrent requests
        (one round trip for a read's shards, not one per shard); a shard the marker does not record is
        background, with no request at all."""
        lay = self.layout
        if self._root is not None or not lay.sharded or not lay.index_at_end or self._written is None:
            return
        with self._lock:
            todo = [s for s in shards if s not in self._index_cache]
        wanted = []
        for shard in todo:
            record = self._written.get(lay.key(shard))
            if record is None:
                self._cache_index(shard, None)
            else:
                wanted.append((shard, record[0]))
        if len(wanted) < 2:
            return
        prefix = f"{self._prefix}/" if self._prefix else ""
        requests = [
            (f"{prefix}{lay.key(s)}", RangeByteRequest(max(0, n - lay.index_nbytes), n)) for s, n in wanted
        ]
        bufs = sync(self._store.get_partial_values(default_buffer_prototype(), requests))
        for (shard, size), buf in zip(wanted, bufs):
            key = lay.key(shard)
            if buf is None:
                self._absent(key)
            elif len(buf) != min(size, lay.index_nbytes):
                raise self._damaged(key, "the object is shorter than recorded (truncated)")
            else:
                self._cache_index(shard, self._index_from(key, buf.to_bytes(), size))

    def _chunk_bytes(
        self, shard: tuple[int, ...] | None, chunks: np.ndarray
    ) -> list[bytes | memoryview | None]:
        """Encoded bytes of chunks `(n, ndim)` (all in `shard`, or unsharded); None = not written."""
        if shard is None:
            return [(b[0][0] if (b := self._fetch(self.layout.key(c))) else None) for c in chunks.tolist()]
        index = self._shard_index(shard)
        if index is None:
            return [None] * len(chunks)
        within = chunks - np.asarray(shard) * self._per_shard
        entries = index[tuple(within.T)]  # (n, 2): offset, nbytes
        result: list[bytes | memoryview | None] = [None] * len(chunks)
        present = np.flatnonzero(entries[:, 0] != MISSING)
        if not len(present):
            return result
        offsets = entries[present, 0].astype(np.int64)
        sizes = entries[present, 1].astype(np.int64)
        order = np.argsort(offsets, kind="stable")
        # coalesce nearby ranges into spans: one read per span
        spans: list[list[int]] = []
        members: list[list[int]] = []
        for k in order:
            a, b = int(offsets[k]), int(offsets[k] + sizes[k])
            if spans and a - spans[-1][1] <= self._gap:
                spans[-1][1] = max(spans[-1][1], b)
                members[-1].append(k)
            else:
                spans.append([a, b])
                members.append([k])
        got = self._fetch(self.layout.key(shard), ranges=[(a, b) for a, b in spans])
        if got is None:  # the shard vanished between index and data reads
            return result
        for (a, _), ks, blob in zip(spans, members, got[0]):
            view = memoryview(blob)
            for k in ks:
                lo = int(offsets[k]) - a
                result[int(present[k])] = view[lo : lo + int(sizes[k])]
        return result

    # --- chunks and boxes ----------------------------------------------------------------------------

    def _decode(
        self, data: bytes | memoryview | None, dest: np.ndarray | None, chunk: np.ndarray | None = None
    ) -> np.ndarray | None:
        """One chunk `chunk_shape`, decoded into `dest` if given; None (with `dest` untouched) if the chunk
        was not written. Bytes that do not decode to one chunk raise StoreError naming `chunk`."""
        if data is None:
            return None
        if dest is None:
            dest = np.empty(self.chunk_shape, dtype=self.dtype)
        try:
            if self.layout.image is not None:  # JPEG / JPEG XL / WebP: a (y, x, C) tile, copied transposed
                dest[...] = self.layout.decode_image(data)
            elif self.codec is None:
                dest[...] = np.frombuffer(data, dtype=self.stored_dtype).reshape(self.chunk_shape)
            elif self.stored_dtype == self.dtype:
                self._decode_into(data, dest)
            else:
                dest[...] = np.frombuffer(self.codec.decode(data), dtype=self.stored_dtype).reshape(
                    self.chunk_shape
                )
        except Exception as e:  # noqa: BLE001 - any codec failure is damage, named with its chunk
            c = tuple(int(v) for v in chunk) if chunk is not None else ()
            key = self.layout.key(np.asarray(c) // self._per_shard if self.sharded else c)
            raise self._damaged(key, f"does not decode ({type(e).__name__}: {e})", c) from None
        return dest

    def _read_group(self, shard: tuple[int, ...] | None, members: np.ndarray, plan: _Plan) -> None:
        """Chunks `plan.chunks[members]` (all in `shard`, or unsharded): fetch, decode, copy."""
        chunks = plan.chunks[members]
        datas = self._chunk_bytes(shard, chunks)
        if all(d is None for d in datas) and bool(np.all(plan.direct_slot[members] >= 0)):
            # unwritten (background) chunks that are whole patches: one vectorised fill
            plan.out[plan.direct_slot[members]] = self.fill_value
            for i in members[plan.edge[members]]:
                self._pad_outside(plan.out[plan.direct_slot[i]], plan.chunks[i] * self._chunk)
            return
        for i, chunk, data in zip(members, chunks, datas):
            c_lo = chunk * self._chunk
            slot = plan.direct_slot[i]
            if slot >= 0:  # the patch is this chunk: decode straight into the output
                dest = plan.out[slot]
                if self._decode(data, dest, chunk) is None:
                    dest[...] = self.fill_value
                if plan.edge[i]:  # the rest of an edge chunk is outside the array
                    self._pad_outside(dest, c_lo)
                continue
            decoded = self._decode(data, None, chunk)
            out, pair_slot, pair_dst = plan.out, plan.pair_slot, plan.pair_dst
            for j in range(plan.bounds[i], plan.bounds[i + 1]):
                dst = pair_dst[j]
                if dst is None:
                    continue
                out[pair_slot[j]][dst] = self.fill_value if decoded is None else decoded[plan.pair_src[j]]

    def _pad_outside(self, dest: np.ndarray, lo: np.ndarray) -> None:
        """Set the part of box `dest` (starting at `lo`) that lies outside the array to `pad_value`."""
        valid = self.shape - lo
        for ax, v in enumerate(valid):
            if v < dest.shape[ax]:
                dest[(slice(None),) * ax + (slice(max(int(v), 0), None),)] = self.pad_value

    def _shard_groups(
        self, uniq: np.ndarray, grid: np.ndarray
    ) -> list[tuple[tuple[int, ...] | None, np.ndarray]]:
        """The unique chunks `(m, ndim)` grouped by shard: `(shard index, positions in uniq)` per shard
        (unsharded: one group per chunk)."""
        if self.sharded:  # one group per shard: its index and bytes are fetched once
            s_grid = -(-grid // self._per_shard)
            s_keys, s_inv = np.unique(
                np.ravel_multi_index(tuple((uniq // self._per_shard).T), s_grid), return_inverse=True
            )
            shards = np.stack(np.unravel_index(s_keys, s_grid), axis=1)
            groups = [
                (tuple(int(v) for v in shards[g]), m)
                for g, m in enumerate(_split_by(s_inv.reshape(-1), len(s_keys)))
            ]
        else:
            groups = [(None, np.arange(i, i + 1)) for i in range(len(uniq))]
        return groups

    def read_boxes(
        self,
        lo: np.ndarray,
        size: tuple[int, ...],
        out: np.ndarray,
        slots: np.ndarray,
        executor: Executor | None = None,
        parallel: int = 1,
    ) -> None:
        """Fill `out[slots[j]]` `(*size)` with the box at `lo[j]` (int `(n, ndim)`), padded outside the
        array. Chunks are grouped by shard; with an `executor`, up to `parallel` runs of shards are read
        at once (the calling thread takes one)."""
        lo = np.asarray(lo, dtype=np.int64)
        slots = np.asarray(slots, dtype=np.int64)
        if len(lo) == 0:
            return
        size_a = np.asarray(size, dtype=np.int64)
        hi = lo + size_a
        outside = np.flatnonzero(np.any(hi > self.shape, axis=1) | np.any(lo < 0, axis=1))
        for b in outside:
            out[slots[b]] = self.pad_value
        # every (chunk, box) pair: a box spans at most ceil(size / chunk) + 1 chunks per axis
        first = np.maximum(lo, 0) // self._chunk
        last = (np.minimum(hi, self.shape) - 1) // self._chunk
        span = int(np.max(last - first)) + 1 if len(lo) else 1
        pairs_c, pairs_b = [], []
        for offset in itertools.product(range(span), repeat=lo.shape[1]):
            c = first + np.asarray(offset)
            ok = np.all(c <= last, axis=1)
            pairs_c.append(c[ok])
            pairs_b.append(np.flatnonzero(ok))
        chunk_of = np.concatenate(pairs_c)
        box_of = np.concatenate(pairs_b)
        if not len(chunk_of):
            return
        # unique chunks by linear key (raster order), and the boxes of each: user_order[bounds[i]:bounds[i+1]]
        grid = -(-self.shape // self._chunk)  # chunks per axis
        keys, inverse = np.unique(np.ravel_multi_index(tuple(chunk_of.T), grid), return_inverse=True)
        uniq = np.stack(np.unravel_index(keys, grid), axis=1).astype(np.int64)  # (m, ndim)
        inverse = inverse.reshape(-1)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
        user_order = box_of[order]
        first_user = user_order[bounds[:-1]]
        c_lo = uniq * self._chunk
        # a chunk that is exactly one requested patch (and used by no other) is decoded into the output
        direct = (
            (np.diff(bounds) == 1)
            & np.all(lo[first_user] == c_lo, axis=1)
            & bool(np.all(size_a == self._chunk))
        )
        # copy geometry of every (chunk, box) pair; not needed when every chunk is decoded into the output
        pair_src, pair_dst = (
            ([], [])
            if direct.all()
            else _copy_geometry(lo, hi, user_order, c_lo[inverse[order]], self._chunk, self.shape)
        )
        plan = _Plan(
            chunks=uniq,
            bounds=bounds.tolist(),
            direct_slot=np.where(direct, slots[first_user], -1),
            edge=np.any(c_lo + self._chunk > self.shape, axis=1),
            out=out,
            pair_slot=slots[user_order].tolist(),
            pair_src=pair_src,
            pair_dst=pair_dst,
        )
        groups = self._shard_groups(uniq, grid)
        self._prefetch_indexes([g[0] for g in groups if g[0] is not None])
        # at most `parallel` tasks, each a run of whole shards (a task per shard costs more than a
        # small shard's work), the last run in the calling thread
        n_tasks = 1 if executor is None else max(1, min(parallel, len(groups)))
        runs = [r for r in np.array_split(np.arange(len(groups)), n_tasks) if len(r)]

        def work(run: np.ndarray) -> None:
            for g in run:
                self._read_group(*groups[g], plan)

        futures = [executor.submit(work, r) for r in runs[:-1]] if executor is not None else []
        try:
            work(runs[-1])
        finally:
            for f in futures:
                f.result()
