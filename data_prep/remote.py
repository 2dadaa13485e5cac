"""`ips prep --out s3://bucket/prefix` (or `gs://`): stores written straight to object storage.

An object store has no rename, so the local recipe (a partial folder renamed into place) becomes: write
every object in place under `DIR/<slide_id>.zarr/`, and the completion marker last, in one PUT (an
object appears whole or not at all). Readers refuse a store without the marker (`ips.data.store`), so a
prep killed mid-write leaves a store that reads as incomplete; a rerun deletes what is there and redoes
it. Redoing or overwriting a store deletes its marker first, so it never reads as complete meanwhile.

Locks: none on object storage (no flock there); one writer per store is the rule, which `--shard i/n`,
`--workers` and `--dask` keep (each input goes to one task). Thumbnails are drawn into a local temporary
file and uploaded beside the store after the marker, as locally.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import zarr

from data_prep.writer import ShardEncoder, StoreWriter
from ips.format import location
from ips.format.checksums import bytes_record
from ips.format.location import is_remote
from ips.format.names import COMPLETE_MARKER
from ips.format.store import seal


class RemoteShardEncoder(ShardEncoder):
    """`ShardEncoder` whose shards go to an object store as whole objects (one PUT each)."""

    def __init__(
        self, array: zarr.Array, store: Any, prefix: str, records: dict[str, list[int]] | None = None
    ) -> None:
        super().__init__(array, PurePosixPath(prefix), records)  # type: ignore[arg-type]
        self._store = store

    def _put(self, path: Any, data: bytes) -> None:  # type: ignore[override]
        location.put_bytes(self._store, str(path), data)

    def _scratch_dir(self) -> Path | None:
        return None  # the system's temporary folder

    def _put_parts(self, path: Any, parts: Any) -> list[int]:  # type: ignore[override]
        data = b"".join(parts)  # one PUT: the shard whole, once, while it goes out
        self._put(path, data)
        return bytes_record(data)

    def _remove(self, path: Any) -> None:  # type: ignore[override]
        pass  # `begin` starts from an empty prefix: a shard not written is not there


class RemoteStoreWriter(StoreWriter):
    """`StoreWriter` for object storage: the store at the URL `DIR/<slide_id>.zarr` is written in place;
    `commit` writes the marker last; `abort` deletes the objects written."""

    def __init__(self, out_dir: str | Path, slide_id: str) -> None:
        self.out_dir, self.slide_id = str(out_dir).rstrip("/"), slide_id
        self.final = self.partial = location.join(self.out_dir, f"{slide_id}.zarr")  # type: ignore[assignment]
        self.store = location.object_store(str(self.final), read_only=False)
        self.group: zarr.Group | None = None
        self.records: dict[str, dict[str, list[int]]] = {}
        self._staged: list[Path] = []

    def begin(self) -> zarr.Group:
        """Start from an empty prefix: the marker of an old store goes first, then everything else."""
        location.delete_key(self.store, COMPLETE_MARKER)
        location.delete_prefix(self.store, "")
        self.group = zarr.create_group(store=self.store, zarr_format=3)
        return self.group

    def encoder(self, name: str, array: zarr.Array) -> ShardEncoder:
        return RemoteShardEncoder(array, self.store, name, self.records.setdefault(name, {}))

    def commit(self, grids: list[str]) -> Path:
        """Record every array's objects (sizes from one listing; small arrays read back for their
        crc32c) and metadata, then write the marker: the one PUT that makes the store complete."""
        seal(self.final, grids, known=self.records)
        return self.final  # type: ignore[return-value]

    def staging(self, name: str) -> Path:
        fd, tmp = tempfile.mkstemp(prefix=f"ips-{self.slide_id}-", suffix=Path(name).suffix)
        os.close(fd)
        self._staged.append(Path(tmp))
        return Path(tmp)

    def publish(self, staged: Path, name: str) -> None:
        out = location.object_store(self.out_dir, read_only=False)
        location.put_bytes(out, name, staged.read_bytes())
        staged.unlink(missing_ok=True)

    def abort(self) -> None:
        try:
            location.delete_prefix(self.store, "")
        finally:
            for staged in self._staged:
                staged.unlink(missing_ok=True)


def open_writer(out_dir: str | Path, slide_id: str) -> StoreWriter:
    """The writer of `out_dir/<slide_id>.zarr`: local (partial folder + rename, `StoreWriter`) or on object
    storage (written in place, the marker last, `RemoteStoreWriter`)."""
    if is_remote(out_dir):
        return RemoteStoreWriter(out_dir, slide_id)
    return StoreWriter(out_dir, slide_id)
