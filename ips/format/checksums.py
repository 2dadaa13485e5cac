"""What a complete store holds, recorded in its completion marker (docs/FORMAT.md, "Integrity").

The marker lists, per array (path in the store, e.g. `"0"`, `"grids/default/coords"`), every chunk or
shard file that was written: its key (relative to the array, `c/0/1`), its size in bytes and the
crc32c of its bytes. A key that is not listed was never written (background, the fill value stands for
it); a listed key that is missing, of another size or with another checksum was lost or damaged. Array
metadata (`zarr.json`) is not listed: attributes change legitimately (a grid added, features computed)
and zarr refuses a missing or broken `zarr.json` by itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import google_crc32c

from ips.format.names import COMPLETE_MARKER

CHECKSUM = "crc32c"
ArrayRecord = dict[str, list[int]]  # chunk/shard key -> [size in bytes, crc32c]
_READ = 1 << 22


def file_record(path: str | Path) -> list[int]:
    """`[size, crc32c]` of a file, read in 4 MiB pieces."""
    crc = 0
    size = 0
    with open(path, "rb") as f:
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
    """`{array path: record}` of every array in a local store (or those in `only`)."""
    store = Path(store)
    known = known or {}
    return {
        a: scan_array(store / a, known.get(a)) for a in (only if only is not None else array_paths(store))
    }


def read_marker(store: str | Path) -> dict[str, Any]:
    """The completion marker of a local store (raises OSError / ValueError if missing or not JSON)."""
    marker = json.loads((Path(store) / COMPLETE_MARKER).read_text())
    if not isinstance(marker, dict):
        raise ValueError(f"{COMPLETE_MARKER} is not a JSON object")
    return marker
