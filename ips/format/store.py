"""The store contract in one module (docs/FORMAT.md): a store's names on disk, its completion marker, the
commit that makes a store complete, opening a store checked, and verifying it.

Writers (`data_prep.writer`, `data_prep.remote`, `ips.synthetic`) build a store in a partial folder and
make it complete with `commit` (local: the marker written inside, then one rename) or `seal` (object
storage, where the marker written last is the step). Readers open it with `open_store`; `ips verify` runs
`verify_store`. The chunk/shard byte layout is `ips.format.sharding`, the checksums `ips.format.checksums`,
the constant names `ips.format.names`; where a store lives (and the guard that keeps local reads inside
it) `ips.format.location`.

The marker (`Marker`) is strict: one that does not parse, or lacks what its format requires, means the
store is damaged, and every reader refuses it with a one-line `StoreError` naming the file. Only a
genuine format-1 store (attributes and marker both say so) opens, with a warning that it cannot be checked.

Integrity: the marker records every written chunk/shard file with its size and crc32c and (format 3)
each array's metadata (shape, data type, chunk grid, key encoding, fill value, codecs) and each grid's
attributes. Opening checks that every recorded file exists with its size (one `stat` each) and that the
grids' attributes are the recorded ones; each array's metadata is checked when it is first used; small
arrays read through zarr are checksummed on every read; pixel reads check what they touch
(`ips.data.chunk_io`); `verify_store` checks everything, every checksum included.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from ips._version import __version__
from ips.errors import StoreError
from ips.format import checksums
from ips.format import location as loc
from ips.format import names as sf
from ips.format.checksums import ArrayRecord

StoreLocation = str | Path | zarr.abc.store.Store
REBUILD = "rebuild it with `ips prep --overwrite`"
# the parts of an array's zarr.json that decide what its bytes mean (not its attributes or axis names)
ARRAY_FIELDS = ("shape", "data_type", "chunk_grid", "chunk_key_encoding", "fill_value", "codecs")


class UnverifiedStoreWarning(UserWarning):
    """A store without a record of what was written (format 1): damage to it cannot be detected."""


_WARNED: set[str] = set()


# --- names ------------------------------------------------------------------------------------------------


def store_location(out_dir: str | Path, slide_id: str) -> str | Path:
    """`DIR/<slide_id>.zarr`: a Path, or (object storage) a URL."""
    return loc.join(out_dir, f"{slide_id}.zarr")


def store_paths(out_dir: str | Path, slide_id: str) -> tuple[Path, Path]:
    """`(final, partial)`: `DIR/<slide_id>.zarr` and this process's `DIR/.<slide_id>.zarr.partial-<pid>`."""
    out_dir = Path(out_dir)
    return out_dir / f"{slide_id}.zarr", out_dir / f".{slide_id}.zarr{sf.PARTIAL_SUFFIX}-{os.getpid()}"


def remove_stale(out_dir: str | Path, slide_id: str) -> None:
    """Remove partial and old copies of `slide_id`'s store left by killed runs. Call with its lock held
    (`data_prep.writer.StoreLock`): no other prep is then writing them."""
    for stale in Path(out_dir).glob(f".{slide_id}.zarr.*"):
        if stale.name.endswith(sf.LOCK_SUFFIX):
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def is_complete(location: str | Path) -> bool:
    """Whether the store at `location` has its completion marker (whatever the marker holds)."""
    if loc.is_remote(location):
        return loc.get_bytes(loc.object_store(str(location)), sf.COMPLETE_MARKER) is not None
    return os.path.lexists(loc.local_path(location) / sf.COMPLETE_MARKER)


def describe(location: StoreLocation) -> str:
    """The store's name in messages: its path or URL, or the store object's repr."""
    return str(location) if isinstance(location, (str, Path)) else repr(location)


def is_local(location: StoreLocation) -> bool:
    """True for a local path (a `Path`, a string without a URL scheme, or a `file://` URL)."""
    return isinstance(location, (str, Path)) and not loc.is_remote(location)


# --- the marker -------------------------------------------------------------------------------------------


def _normal(value: Any) -> Any:
    """`value` as JSON gives it back (tuples as lists, ...): what a marker holds after a round trip."""
    return json.loads(json.dumps(value))


def node_metadata(doc: dict[str, Any]) -> dict[str, Any]:
    """The recorded part of a node's `zarr.json` `doc`: for an array the fields that decide what its bytes
    mean (`ARRAY_FIELDS`), for a group its attributes."""
    if doc.get("node_type") == "array":
        return _normal({k: doc.get(k) for k in ARRAY_FIELDS})
    return _normal({"attributes": doc.get("attributes", {})})


def _damaged(where: str, what: str) -> StoreError:
    return StoreError(f"{where}: damaged completion marker ({what}); the store cannot be checked: {REBUILD}")


def _records_ok(record: Any) -> bool:
    """`record` is `{key: [size, crc32c]}` with non-negative integers (crc32c below 2**32)."""
    if type(record) is not dict:
        return False
    for v in record.values():
        if type(v) is not list or len(v) != 2:
            return False
        size, crc = v
        if type(size) is not int or type(crc) is not int or size < 0 or not 0 <= crc < 1 << 32:
            return False
    return True


@dataclass(frozen=True)
class Marker:
    """The completion marker `ips_complete.json`: the grids it vouches for and what was written.

    `arrays`: array path -> `{chunk/shard key: [size, crc32c]}` (None: format 1, nothing recorded).
    `metadata`: node path -> `node_metadata` of each recorded array and listed grid group (None: before
    format 3).
    """

    format_version: int
    grids: tuple[str, ...]
    arrays: dict[str, ArrayRecord] | None = None
    metadata: dict[str, dict[str, Any]] | None = None
    tool_version: str = ""
    completed: str = ""

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "format_version": self.format_version,
            "tool_version": self.tool_version,
            "completed": self.completed,
            "grids": list(self.grids),
            "checksum": checksums.CHECKSUM,
            "arrays": self.arrays,
            "metadata": self.metadata,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, data: bytes, where: str) -> Marker:
        """The marker in `data`, checked against what its format requires; StoreError naming `where`."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise _damaged(where, f"not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise _damaged(where, "not a JSON object")
        grids = doc.get("grids")
        if not isinstance(grids, list) or not all(isinstance(g, str) for g in grids):
            raise _damaged(where, "'grids' is not a list of names")
        version = doc.get("format_version", 1)
        if version == 1 and "format_version" not in doc and ("arrays" in doc or "checksum" in doc):
            raise _damaged(where, "no 'format_version' beside a checksum record")
        if version not in sf.READABLE_VERSIONS or isinstance(version, bool):
            raise _damaged(where, f"format_version {version!r}")
        if version == 1:
            return cls(1, tuple(grids), tool_version=str(doc.get("tool_version", "")))
        for key in ("tool_version", "completed"):
            if not isinstance(doc.get(key), str):
                raise _damaged(where, f"no {key!r}")
        if doc.get("checksum") != checksums.CHECKSUM:
            raise _damaged(where, f"checksum {doc.get('checksum')!r}, not {checksums.CHECKSUM!r}")
        arrays = doc.get("arrays")
        if not isinstance(arrays, dict) or not all(_records_ok(r) for r in arrays.values()):
            raise _damaged(where, "'arrays' is not a record of [size, crc32c] per file")
        metadata = doc.get("metadata") if version >= 3 else None
        if version >= 3:
            if not isinstance(metadata, dict) or not all(isinstance(m, dict) for m in metadata.values()):
                raise _damaged(where, "no 'metadata' record")
            unrecorded = [a for a in arrays if a not in metadata]
            unrecorded += [f"{sf.GRIDS_GROUP}/{g}" for g in grids if f"{sf.GRIDS_GROUP}/{g}" not in metadata]
            if unrecorded:
                raise _damaged(where, f"no metadata recorded for {unrecorded[0]!r}")
        return cls(version, tuple(grids), arrays, metadata, doc["tool_version"], doc["completed"])


def _store_object(location: StoreLocation, *, read_only: bool = True) -> Any:
    """The zarr store of `location` (a checked local store for a path)."""
    if isinstance(location, zarr.abc.store.Store):
        return location
    return loc.zarr_store(location, read_only=read_only)


def read_marker(location: StoreLocation) -> Marker | None:
    """The marker of the store at `location` (None: there is none; StoreError: it is damaged)."""
    data = loc.get_bytes(_store_object(location), sf.COMPLETE_MARKER)
    if data is None:
        return None
    return Marker.parse(data, f"{describe(location).rstrip('/')}/{sf.COMPLETE_MARKER}")


def write_marker(location: str | Path, marker: Marker) -> None:
    """Write the marker: locally atomically (temp file, fsync, rename), on object storage in one PUT (an
    object appears whole or not at all)."""
    data = marker.to_json()
    if loc.is_remote(location):
        loc.put_bytes(loc.object_store(str(location), read_only=False), sf.COMPLETE_MARKER, data)
        return
    root = loc.local_path(location)
    tmp = root / f".{sf.COMPLETE_MARKER}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / sf.COMPLETE_MARKER)


def seal(
    location: str | Path,
    grids: Sequence[str],
    *,
    known: dict[str, ArrayRecord] | None = None,
    only: Sequence[str] | None = None,
) -> Marker:
    """Record what the store at `location` holds now and write its marker; returns it.

    Every array's chunk/shard files (sizes, crc32c; entries of `known` whose file still has the recorded
    size are taken as they are: the writer computed them from the bytes it wrote), each array's metadata
    and each listed grid's attributes. With `only` (array paths), those arrays are recorded anew and the
    rest is kept from the present marker (a grid added, pixels filled in by a benchmark).
    """
    previous = read_marker(location) if only is not None else None
    if only is not None and (previous is None or previous.arrays is None):
        raise StoreError(
            f"{describe(location)}: records no checksums (format 1, or incomplete); {REBUILD} before adding to it"
        )
    arrays = dict(previous.arrays or {}) if previous is not None else {}
    metadata = dict(previous.metadata or {}) if previous is not None else {}
    scanned = checksums.scan_store(location, known, list(only) if only is not None else None)
    arrays.update(scanned)
    group = zarr.open_group(_store_object(location), mode="r")
    # a format-2 store gets the record of every array: its marker becomes format 3 (its attributes, which
    # nothing else changes, stay: one write, so no crash leaves the two disagreeing)
    for path in arrays:
        if path in scanned or path not in metadata:
            metadata[path] = node_metadata(group[path].metadata.to_dict())
    for g in grids:
        metadata[f"{sf.GRIDS_GROUP}/{g}"] = node_metadata(group[f"{sf.GRIDS_GROUP}/{g}"].metadata.to_dict())
    marker = Marker(
        format_version=sf.FORMAT_VERSION,
        grids=tuple(dict.fromkeys(grids)),
        arrays=dict(sorted(arrays.items())),
        metadata=dict(sorted(metadata.items())),
        tool_version=__version__,
        completed=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    write_marker(location, marker)
    return marker


def commit(
    partial: Path, final: Path, grids: Sequence[str], known: dict[str, ArrayRecord] | None = None
) -> Path:
    """Make the local store built at `partial` complete as `final`: its marker written inside (`seal`),
    then one rename into place (an old store at `final` is moved aside first and removed after). The
    rename is the one step that makes the store complete: an interrupted run never leaves one that reads
    as complete. Returns `final`."""
    seal(partial, grids, known=known)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(partial, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return final


# --- opening ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridInfo:
    """One patch grid: coords are top-left corners in pixels of `level`; `(dims,)` tuples."""

    name: str
    level: int
    patch_size: tuple[int, ...]
    stride: tuple[int, ...]
    min_tissue: float
    n_patches: int


@dataclass(frozen=True)
class FeatureInfo:
    """One precomputed feature set `features/<name>/embeddings` `(N, dim)`, computed on `grid`."""

    name: str
    grid: str
    encoder: str
    dim: int


class IpsStore:
    """A complete ips store, opened read-only (or `r+` to add features) by `open_store`.

    Attributes:
        location: what was opened (path, URL or zarr store), for messages and reopening.
        group: the root zarr group; marker: its `Marker` (format_version 1: nothing recorded).
        spatial_dims, channels, background, spacing, level_downsamples: the `ips` attributes (`spacing`
            and `level_downsamples` are of the store's own levels: array `0` first).
        source_downsample: `(dims,)` source level-0 pixels per store level-0 pixel (`ips.source_level`:
            > 1 for a store made with `--store-from grid`; 1 for a store without the record).
        grids, features: name -> `GridInfo` / `FeatureInfo`; complete_grids: those the marker lists.

    Coordinates reported to users (heatmaps, GeoJSON, annotations, the viewer) are the source's level-0
    pixels: `level_downsample` and `source_spacing` map store levels to them.
    """

    def __init__(self, location: StoreLocation, group: zarr.Group, marker: Marker) -> None:
        self.location = location
        self.group = group
        self.name = describe(location)
        self.marker = marker
        attrs = group.attrs.asdict().get(sf.IPS_ATTR)
        if not isinstance(attrs, dict):
            raise StoreError(f"{self.name}: not an ips store (no '{sf.IPS_ATTR}' attribute in zarr.json)")
        version = attrs.get("format_version")
        if version not in sf.READABLE_VERSIONS or isinstance(version, bool):
            raise StoreError(
                f"{self.name}: store format_version {version!r}; this ips reads versions "
                f"{', '.join(map(str, sf.READABLE_VERSIONS))} (rerun `ips prep --overwrite`)"
            )
        self.format_version = int(version)
        # equal; or a format-3 marker on a format-2 store (a grid added since: more is recorded, not less)
        if marker.format_version != self.format_version and (marker.format_version, self.format_version) != (
            3,
            2,
        ):
            raise _damaged(
                f"{self.name}/{sf.COMPLETE_MARKER}",
                f"format {marker.format_version}, the store's attributes say {self.format_version}",
            )
        # array path -> {key: [size, crc32c]} of every written chunk/shard; None: not recorded (format 1)
        self.written: dict[str, ArrayRecord] | None = marker.arrays
        self.attrs: dict[str, Any] = attrs
        self._parse(attrs)
        # a grid counts once the completion marker lists it (a grid added later may be half-written)
        self.complete_grids = set(self.grids) & set(marker.grids)
        self._checked: set[str] = set()
        self._check_record()

    def _parse(self, attrs: dict[str, Any]) -> None:
        try:
            self.spatial_dims = int(attrs["spatial_dims"])
            self.channels = int(attrs["channels"])
            self.background = attrs.get("background", 0)
            self.spacing = attrs.get("spacing")
            self.level_downsamples = [tuple(d) for d in attrs.get("level_downsamples", [])]
            source = (attrs.get("source_level") or {}).get("downsample") or [1] * self.spatial_dims
            self.source_downsample = np.asarray(source, dtype=np.float64).reshape(self.spatial_dims)
            self.grids = {
                name: GridInfo(
                    name,
                    int(g["level"]),
                    tuple(int(v) for v in g["patch_size"]),
                    tuple(int(v) for v in g["stride"]),
                    float(g.get("min_tissue", 0.0)),
                    int(g["n_patches"]),
                )
                for name, g in attrs.get("grids", {}).items()
            }
            self.features = {
                name: FeatureInfo(
                    name, str(f.get("grid", sf.DEFAULT_GRID)), str(f.get("encoder", "")), int(f["dim"])
                )
                for name, f in (attrs.get("features") or {}).items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StoreError(
                f"{self.name}: malformed '{sf.IPS_ATTR}' attributes ({type(e).__name__}: {e})"
            ) from None

    def _check_record(self) -> None:
        """A marker with checksums records every array a reader uses, and (format 3) the attributes of
        every grid it lists: anything less is a damaged marker, not an unchecked array."""
        if self.written is None:
            return
        where = f"{self.name}/{sf.COMPLETE_MARKER}"
        for path in self.required_arrays():
            if path not in self.written:
                raise _damaged(where, f"array {path!r} is not recorded")
        if self.marker.metadata is None:
            return
        for g in sorted(self.complete_grids):
            recorded = self.marker.metadata[f"{sf.GRIDS_GROUP}/{g}"].get("attributes")
            if _normal(self.attrs["grids"][g]) != recorded:
                raise StoreError(
                    f"{self.name}: grid {g!r}: its attributes in zarr.json differ from those recorded in "
                    f"{sf.COMPLETE_MARKER} (changed since prep); {REBUILD}"
                )

    def required_arrays(self) -> list[str]:
        """The arrays a complete store holds: every level, the mask (when one was made), and the coords
        and tissue of each complete grid."""
        levels = [str(k) for k in range(max(1, len(self.level_downsamples)))]
        mask = [sf.MASK_ARRAY] if isinstance(self.attrs.get("mask"), dict) else []
        grids = [
            f"{sf.GRIDS_GROUP}/{g}/{a}"
            for g in sorted(self.complete_grids)
            for a in (sf.COORDS_ARRAY, sf.TISSUE_ARRAY)
        ]
        return levels + mask + grids

    def __repr__(self) -> str:
        return f"IpsStore({self.name}, dims={self.spatial_dims}, grids={list(self.grids)})"

    def level_downsample(self, level: int) -> np.ndarray:
        """Per-axis factors `(dims,)` of store level `level` relative to the *source's* level 0 (the
        store's own factors, 2**level where it has none, times `source_downsample`)."""
        if level < len(self.level_downsamples):
            own = np.asarray(self.level_downsamples[level], dtype=np.float64)
        else:
            own = np.full(self.spatial_dims, 2.0**level)
        return own * self.source_downsample

    @property
    def source_spacing(self) -> list[float] | None:
        """Physical size of a source level-0 pixel `(dims,)` in micrometers (None when unknown)."""
        if not self.spacing:
            return None
        return [float(s) / float(d) for s, d in zip(self.spacing, self.source_downsample)]

    def grid(self, name: str = sf.DEFAULT_GRID) -> GridInfo:
        valid = ", ".join(sorted(self.complete_grids)) or "none"
        if name in self.grids and name not in self.complete_grids:
            raise StoreError(
                f"{self.name}: grid {name!r} is incomplete (not listed in {sf.COMPLETE_MARKER}; "
                f"rerun `ips prep`); complete grids: {valid}"
            )
        if name not in self.grids:
            raise StoreError(f"{self.name}: unknown grid {name!r}; valid grid names: {valid}")
        return self.grids[name]

    def feature(self, name: str = sf.DEFAULT_GRID) -> FeatureInfo:
        if name not in self.features:
            valid = ", ".join(sorted(self.features)) or "none (compute them with `ips embed`)"
            raise StoreError(f"{self.name}: unknown feature set {name!r}; valid feature sets: {valid}")
        return self.features[name]

    def metadata_problem(self, key: str, doc: dict[str, Any]) -> str | None:
        """What is wrong with node `key`'s metadata `doc` (its zarr.json as a dict) against the marker's
        record (format 3) and what the `ips` attributes record (every format: each level's shape, the
        pixel dtype); None: nothing."""
        if "pickle" in json.dumps(doc.get("codecs", [])):  # a pickle codec runs code from the store
            return "a pickle codec (it would run code from the store; refused)"
        recorded = (self.marker.metadata or {}).get(key)
        if recorded is not None:
            changed = _difference(node_metadata(doc), recorded, "")
            if changed is not None:
                return changed
        if key.isdigit() and doc.get("node_type") == "array":
            shapes = self.attrs.get("level_shapes")
            k = int(key)
            if isinstance(shapes, list) and k < len(shapes) and _normal(doc.get("shape")) != shapes[k]:
                return f"shape {doc.get('shape')}, the store's level_shapes say {shapes[k]}"
            dtype = self.attrs.get("dtype")
            if dtype is not None and doc.get("data_type") != dtype:
                return f"data_type {doc.get('data_type')!r}, the store's dtype is {dtype!r}"
        return None

    def _array(self, key: str) -> zarr.Array:
        try:
            node = self.group[key]
        except KeyError:
            raise StoreError(f"{self.name}: missing array {key!r}") from None
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - a zarr.json that does not parse is damage
            raise StoreError(
                f"{self.name}: array {key!r}: metadata (zarr.json) damaged ({_first_line(e)})"
            ) from None
        if not isinstance(node, zarr.Array):
            raise StoreError(f"{self.name}: {key!r} is not an array")
        if key not in self._checked:
            problem = self.metadata_problem(key, node.metadata.to_dict())
            if problem is not None:
                raise StoreError(
                    f"{self.name}: array {key!r} zarr.json: {problem} (changed since prep); {REBUILD}"
                )
            self._checked.add(key)
        return node

    def level(self, level: int) -> zarr.Array:
        """Pyramid level `level`: `(C, Y, X)` or `(C, Z, Y, X)`, its metadata checked."""
        return self._array(str(level))

    def written_keys(self, key: str) -> dict[str, list[int]] | None:
        """`{chunk key: [size, crc32c]}` recorded for array `key` (None: the store records nothing for it,
        e.g. format 1, or features added after prep)."""
        return None if self.written is None else self.written.get(key)

    def read_small(self, key: str) -> np.ndarray:
        """All of a small array read through zarr (coords, tissue, mask), its recorded chunks checked
        first: each must exist with its size and crc32c, so a lost chunk is not read as the fill value."""
        array = self._array(key)
        record = self.written_keys(key)
        if record:
            for chunk_key, (size, crc), got in zip(record, record.values(), self._records(key, record)):
                if got is None:
                    raise StoreError(
                        f"{self.name}: array {key!r} chunk {chunk_key!r}: missing (written by "
                        f"ips prep, since lost); {REBUILD}"
                    )
                if got != [size, crc]:
                    raise StoreError(
                        f"{self.name}: array {key!r} chunk {chunk_key!r}: {got[0]} bytes, crc32c "
                        f"{got[1]:08x}; written {size} bytes, crc32c {crc:08x} (damaged); {REBUILD}"
                    )
        try:
            return np.asarray(array[...])
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - a codec failure is damage, named with the array
            raise StoreError(
                f"{self.name}: array {key!r} does not decode ({type(e).__name__}: {e}); {REBUILD}"
            ) from None

    def mask(self) -> np.ndarray | None:
        """The tissue mask `(y, x)` / `(z, y, x)` uint8, checked as `read_small` (None: the store has none)."""
        if not isinstance(self.attrs.get("mask"), dict):
            return None
        return self.read_small(sf.MASK_ARRAY)

    def _records(self, key: str, record: dict[str, list[int]]) -> list[list[int] | None]:
        """`[size, crc32c]` of each recorded chunk of array `key` as stored now (None: missing); the
        objects of a remote store are fetched at once. A local file that is a link, or lies outside the
        store, raises StoreError."""
        if is_local(self.location):
            root = loc.local_path(self.location) / key
            guard = loc.RootGuard(loc.local_path(self.location))
            out: list[list[int] | None] = []
            for chunk_key in record:
                path = str(root / chunk_key)
                try:
                    fd = guard.open(path)
                except FileNotFoundError:
                    out.append(None)
                    continue
                except loc.OutsideStore as e:
                    raise StoreError(f"{self.name}: array {key!r} chunk {chunk_key!r}: {e.reason}") from None
                with os.fdopen(fd, "rb") as f:
                    out.append(checksums.stream_record(f))
            return out
        keys = [f"{key}/{k}" for k in record]
        out = []
        for i in range(0, len(keys), 2 * loc.CONCURRENCY):  # in batches: memory bounded by a batch
            datas = loc.get_many(self.group.store, keys[i : i + 2 * loc.CONCURRENCY])
            out += [None if d is None else checksums.bytes_record(d) for d in datas]
        return out

    def coords(self, grid: str = sf.DEFAULT_GRID) -> np.ndarray:
        """Grid coords, int64 `(N, spatial_dims)` (top-left corners, pixels of the grid's level)."""
        info = self.grid(grid)
        coords = np.asarray(self.read_small(f"{sf.GRIDS_GROUP}/{grid}/{sf.COORDS_ARRAY}"), dtype=np.int64)
        if coords.shape != (info.n_patches, self.spatial_dims):
            raise StoreError(
                f"{self.name}: grid {grid!r} coords have shape {coords.shape}, expected "
                f"({info.n_patches}, {self.spatial_dims})"
            )
        return coords

    def embeddings(self, name: str = sf.DEFAULT_GRID) -> zarr.Array:
        """Feature vectors `(N, F)` of feature set `name`."""
        self.feature(name)
        return self._array(f"{sf.FEATURES_GROUP}/{name}/{sf.EMBEDDINGS_ARRAY}")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _difference(got: Any, recorded: Any, where: str) -> str | None:
    """The first place where `got` differs from `recorded` (JSON values), as `codecs[0]...clevel 4,
    recorded 5`; None where they are equal."""
    if got == recorded:
        return None
    if isinstance(got, dict) and isinstance(recorded, dict):
        for key in [*recorded, *(k for k in got if k not in recorded)]:
            found = _difference(got.get(key), recorded.get(key), f"{where}.{key}" if where else str(key))
            if found is not None:
                return found
    if isinstance(got, list) and isinstance(recorded, list) and len(got) == len(recorded):
        for i, (a, b) in enumerate(zip(got, recorded)):
            found = _difference(a, b, f"{where}[{i}]")
            if found is not None:
                return found
    return f"{where} {_short(got)}, recorded {_short(recorded)}"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _partial_hint(location: StoreLocation) -> str:
    """Point at an interrupted `ips prep` output next to a missing local store."""
    path = Path(location)
    partial = next(iter(sorted(path.parent.glob(f".{path.name}{sf.PARTIAL_SUFFIX}*"))), None)
    return f" (a partial conversion exists at {partial}; rerun `ips prep`)" if partial is not None else ""


def _incomplete(name: str) -> StoreError:
    return StoreError(
        f"{name}: incomplete store (no {sf.COMPLETE_MARKER}); its conversion was "
        "interrupted or is still running: rerun `ips prep`"
    )


def _open_group(location: StoreLocation, mode: Literal["r", "r+"]) -> zarr.Group:
    name = describe(location)
    try:
        if isinstance(location, zarr.storage.LocalStore) and not isinstance(location, loc.CheckedLocalStore):
            location = loc.checked_local_store(location.root, read_only=location.read_only)
        return zarr.open_group(_store_object(location, read_only=mode == "r"), mode=mode)
    except StoreError:
        raise
    except (FileNotFoundError, zarr.errors.BaseZarrError) as e:
        gone = loc.is_remote(location) and isinstance(e, FileNotFoundError)
        raise StoreError(
            f"{name}: store does not exist" if gone else f"{name}: not a zarr group ({type(e).__name__}: {e})"
        ) from None
    except (ValueError, UnicodeDecodeError) as e:  # a zarr.json that is not JSON
        raise StoreError(
            f"{name}/zarr.json: damaged ({type(e).__name__}: {_first_line(e)}); {REBUILD}"
        ) from None
    except Exception as e:  # a remote store: network, credentials, bad URL (obstore's own errors)
        if not loc.is_remote(location):
            raise
        raise StoreError(f"{name}: cannot open ({type(e).__name__}: {_first_line(e)})") from None


def open_store(location: StoreLocation, *, mode: Literal["r", "r+"] = "r") -> IpsStore:
    """Open the complete ips store at `location` (local path first; anything zarr accepts), checked.

    Raises StoreError (one line naming the store or its file): missing, not a zarr group, incomplete (no
    completion marker), a damaged marker, not an ips store, a recorded file missing, of another size, a
    link or outside the store, grid attributes changed since prep.
    """
    name = describe(location)
    if is_local(location):
        path = loc.local_path(location)
        if not path.exists():
            raise StoreError(f"{name}: store does not exist{_partial_hint(path)}")
        if not path.is_dir():
            raise StoreError(f"{name}: not a zarr store (not a directory)")
        if not os.path.lexists(path / sf.COMPLETE_MARKER):
            raise _incomplete(name)
    group = _open_group(location, mode)
    try:
        data = loc.get_bytes(group.store, sf.COMPLETE_MARKER)
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - an unreadable marker is as bad as a broken one
        raise _damaged(f"{name}/{sf.COMPLETE_MARKER}", f"unreadable: {_first_line(e)}") from None
    if data is None:
        raise _incomplete(name)
    # the ips attributes first: "not an ips store" says more than a marker complaint
    if not isinstance(group.attrs.asdict().get(sf.IPS_ATTR), dict):
        raise StoreError(f"{name}: not an ips store (no '{sf.IPS_ATTR}' attribute in zarr.json)")
    store = IpsStore(location, group, Marker.parse(data, f"{name.rstrip('/')}/{sf.COMPLETE_MARKER}"))
    if store.written is None:
        if name not in _WARNED:
            _WARNED.add(name)
            warnings.warn(
                f"{name}: format {store.format_version} store without checksums in "
                f"{sf.COMPLETE_MARKER}: lost or damaged chunks cannot be detected (rebuild with "
                "`ips prep --overwrite`)",
                UnverifiedStoreWarning,
                stacklevel=2,
            )
    else:
        check_files(store)
    return store


def check_files(store: IpsStore) -> None:
    """The cheap check: every recorded chunk/shard file exists with its recorded size (one stat each), and
    locally is a plain file inside the store. Raises StoreError naming the store, the array and the first
    bad key."""
    assert store.written is not None
    if is_local(store.location):
        root = str(loc.local_path(store.location))
        guard = loc.RootGuard(root)
        for array, record in store.written.items():
            base = os.path.join(root, array)
            for key, (size, _) in record.items():
                path = os.path.join(base, key)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    raise StoreError(
                        f"{store.name}: array {array!r} chunk {key!r}: missing (written by ips "
                        f"prep, since lost); {REBUILD}"
                    ) from None
                why = guard.reason(path) if stat.S_ISLNK(st.st_mode) else None
                if why is None and not guard.folder_inside(os.path.dirname(path)):
                    why = loc.OUTSIDE
                if why is not None:
                    raise StoreError(f"{store.name}: array {array!r} chunk {key!r}: {why}")
                if st.st_size != size:
                    raise StoreError(
                        f"{store.name}: array {array!r} chunk {key!r}: {st.st_size} bytes, {size} "
                        f"written (truncated or changed); {REBUILD}"
                    )
        return
    # remote: one listing with sizes (a request per 1000 objects), not a HEAD per object; HTTP servers
    # have no listing: a HEAD per object, concurrently
    if isinstance(store.location, str) and loc.scheme_of(store.location) in ("http", "https"):
        keys = [f"{array}/{key}" for array, record in store.written.items() for key in record]
        sizes = loc.sizes_of(store.group.store, keys)
    else:
        sizes = loc.list_sizes(store.group.store)
    for array, record in store.written.items():
        for key, (size, _) in record.items():
            got = sizes.get(f"{array}/{key}")
            if got is None:
                raise StoreError(
                    f"{store.name}: array {array!r} chunk {key!r}: missing (written by ips prep, since lost)"
                )
            if got != size:
                raise StoreError(f"{store.name}: array {array!r} chunk {key!r}: {got} bytes, {size} written")


# --- verifying --------------------------------------------------------------------------------------------


def verify_store(location: StoreLocation) -> list[str]:
    """Every problem of a store, one line each (empty: intact); never raises for a damaged store.

    What `open_store` checks, then each recorded node's metadata (its zarr.json exists and matches the
    marker's record and the `ips` attributes), locally that the store holds no links and no chunk files
    the marker does not record, then each recorded file's crc32c. A store that records no checksums
    (format 1) is one problem."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnverifiedStoreWarning)
            store = open_store(location)
    except StoreError as e:
        return [_first_line(e)]
    except Exception as e:  # noqa: BLE001 - whatever the store holds, verify reports it and goes on
        return [f"{describe(location)}: cannot be opened ({type(e).__name__}: {_first_line(e)})"]
    if store.written is None:
        return [
            f"{store.name}: cannot be verified: format {store.format_version} records no checksums "
            "(rebuild with `ips prep --overwrite`)"
        ]
    try:
        problems = _metadata_problems(store)
        if is_local(store.location):
            problems += _file_problems(store)
        problems += _checksum_problems(store)
    except Exception as e:  # noqa: BLE001 - one line, then the next store
        problems = [f"{store.name}: cannot be verified ({type(e).__name__}: {_first_line(e)})"]
    return problems


def _metadata_problems(store: IpsStore) -> list[str]:
    keys = sorted(set(store.written or {}) | set(store.marker.metadata or {}))
    datas = loc.get_many(store.group.store, [f"{k}/zarr.json" for k in keys])
    problems = []
    for key, data in zip(keys, datas):
        where = f"{store.name}: {key!r} zarr.json"
        if data is None:
            problems.append(f"{where}: missing (its metadata was lost); {REBUILD}")
            continue
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"{where}: not valid JSON ({_first_line(e)}); {REBUILD}")
            continue
        problem = store.metadata_problem(key, doc)
        if problem is not None:
            problems.append(f"{where}: {problem} (changed since prep); {REBUILD}")
    return problems


def _file_problems(store: IpsStore) -> list[str]:
    """Links anywhere in a local store, and files in recorded arrays that the marker does not record."""
    root = loc.local_path(store.location)
    problems = []
    for dirpath, dirnames, files in os.walk(root):
        for entry in [*dirnames, *files]:
            path = os.path.join(dirpath, entry)
            if os.path.islink(path):
                rel = os.path.relpath(path, root)
                problems.append(f"{store.name}: {rel!r}: {loc.LINK}")
    for array, record in (store.written or {}).items():
        base = root / array
        for dirpath, dirnames, files in os.walk(base):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames if not (here / d / "zarr.json").exists()]
            for name in files:
                key = (here / name).relative_to(base).as_posix()
                if key != "zarr.json" and key not in record and not os.path.islink(here / name):
                    problems.append(
                        f"{store.name}: array {array!r} file {key!r}: not written by ips prep (not in "
                        f"{sf.COMPLETE_MARKER}); {REBUILD}"
                    )
    return problems


def _checksum_problems(store: IpsStore) -> list[str]:
    problems = []
    for array, record in (store.written or {}).items():
        try:
            got_records = store._records(array, record)
        except StoreError as e:
            problems.append(_first_line(e))
            continue
        for (key, (size, crc)), got in zip(record.items(), got_records):
            if got is None:
                problems.append(f"{store.name}: array {array!r} chunk {key!r}: missing")
            elif got != [size, crc]:
                problems.append(
                    f"{store.name}: array {array!r} chunk {key!r}: {got[0]} bytes, crc32c "
                    f"{got[1]:08x}; written {size} bytes, crc32c {crc:08x} (damaged)"
                )
    return problems
