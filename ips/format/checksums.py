"""What a complete store holds, recorded in its completion marker (docs/FORMAT.md, "Integrity").

The marker lists, per array (path in the store, e.g. `"0"`, `"grids/default/coords"`), every chunk or
shard file that was written: its key (relative to the array, `c/0/1`), its size in bytes and the
crc32c of its bytes. A key that is not listed was never written (background, the fill value stands for
it); a listed key that is missing, of another size or with another checksum was lost or damaged. What each
array's `zarr.json` must say is recorded beside it (`ips.format.store.node_metadata`); the marker itself is
read, written and checked by `ips.format.store`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO

import google_crc32c

CHECKSUM = "crc32c"
ArrayRecord = dict[str, list[int]]  # chunk/shard key -> [size in bytes, crc32c]
_READ = 1 << 22


def file_record(path: str | Path) -> list[int]:
    """`[size, crc32c]` of a file, read in 4 MiB pieces."""
    with open(path, "rb") as f:
        return stream_record(f)


def stream_record(f: BinaryIO) -> list[int]:
    """`[size, crc32c]` of what is left to read in the open file `f`, read in 4 MiB pieces."""
    crc = 0
    size = 0
    while block := f.read(_READ):
        crc = google_crc32c.extend(crc, block)
        size += len(block)
    return [size, int(crc)]


def bytes_record(data: bytes | memoryview) -> list[int]:
    return [len(data), int(google_crc32c.value(data))]


def array_paths(store: str | Path) -> list[str]:
    """Every array in a local store, as `/`-separated paths relative to the store (sorted)."""
    root = Path(store)
    found = []
    for meta in root.rglob("zarr.json"):
        try:
            node = json.loads(meta.read_text()).get("node_type")
        except (OSError, ValueError):
            continue
        if node == "array":
            found.append(meta.parent.relative_to(root).as_posix())
    return sorted(found)


def scan_array(folder: str | Path, known: ArrayRecord | None = None) -> ArrayRecord:
    """`{key: [size, crc32c]}` of every chunk/shard file under an array's folder (keys relative to it;
    everything but `zarr.json`). Entries of `known` whose file still has the recorded size are taken
    as they are (the writer computed them from the bytes it wrote)."""
    folder = Path(folder)
    record: ArrayRecord = {}
    for dirpath, dirnames, files in os.walk(folder):
        here = Path(dirpath)
        # a nested array or group (its own zarr.json) is not part of this array
        dirnames[:] = sorted(d for d in dirnames if not (here / d / "zarr.json").exists())
        for name in sorted(files):
            if here == folder and name == "zarr.json":
                continue
            path = here / name
            key = path.relative_to(folder).as_posix()
            if known is not None and key in known and known[key][0] == path.stat().st_size:
                record[key] = list(known[key])
            else:
                record[key] = file_record(path)
    return record


def scan_store(
    store: str | Path, known: dict[str, ArrayRecord] | None = None, only: list[str] | None = None
) -> dict[str, ArrayRecord]:
    """`{array path: record}` of every array in a store (or those in `only`); a remote store (URL) is
    scanned by `scan_remote`."""
    from ips.format import location

    if location.is_remote(store):
        return scan_remote(location.object_store(str(store)), known, only)
    store = location.local_path(store)
    known = known or {}
    return {
        a: scan_array(store / a, known.get(a)) for a in (only if only is not None else array_paths(store))
    }


def scan_remote(
    store: Any, known: dict[str, ArrayRecord] | None = None, only: list[str] | None = None
) -> dict[str, ArrayRecord]:
    """`scan_store` for a store on an object store (a zarr store object): one listing with sizes; the
    objects not in `known` with the listed size are read back for their crc32c (small arrays)."""
    from ips.format import location

    sizes = location.list_sizes(store)
    metas = sorted(k for k in sizes if k == "zarr.json" or k.endswith("/zarr.json"))
    arrays = only
    if arrays is None:
        docs = location.get_many(store, metas)
        arrays = sorted(
            m.rsplit("/", 1)[0] if "/" in m else ""
            for m, doc in zip(metas, docs)
            if doc is not None and json.loads(doc).get("node_type") == "array"
        )
    known = known or {}
    nested = {m.rsplit("/", 1)[0] for m in metas if "/" in m}  # every group or array folder
    record: dict[str, ArrayRecord] = {a: {} for a in arrays}
    todo: list[tuple[str, str, str]] = []  # (array, key, object key)
    for a in arrays:
        base = f"{a}/" if a else ""
        for obj, size in sizes.items():
            if not obj.startswith(base) or obj == f"{base}zarr.json":
                continue
            rel = obj[len(base) :]
            # a nested array or group (its own zarr.json) is not part of this array
            if any(f"{base}{p}" in nested for p in _parents(rel)):
                continue
            seen = known.get(a, {}).get(rel)
            if seen is not None and seen[0] == size:
                record[a][rel] = list(seen)
            else:
                todo.append((a, rel, obj))
    for (a, rel, _), data in zip(todo, location.get_many(store, [t[2] for t in todo])):
        if data is not None:
            record[a][rel] = bytes_record(data)
    return {a: dict(sorted(r.items())) for a, r in record.items()}


def _parents(rel: str) -> list[str]:
    """`"c/0/1"` -> `["c", "c/0"]`: the folders above a key."""
    parts = rel.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]
