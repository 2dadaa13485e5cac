"""Open an ips store (docs/FORMAT.md) for reading: check it is complete and intact, parse its `ips`
attributes.

Every problem with a store is a `StoreError` whose one-line message names the store and what is wrong,
so a bad manifest row or a half-written store fails before training starts, not deep inside a read.

Integrity (format 2): the completion marker records every written chunk/shard file with its size and
crc32c (`ips.format.checksums`). Opening checks that each recorded file exists with its recorded size
(one `stat` each); `verify_store` also checks every checksum (`ips verify`); small arrays read through
zarr (grid coords, tissue, mask) are checksummed on every read; pixel reads check what they touch
(`ips.data.chunk_io`). Stores of format 1 have no record: they open with a one-time
`UnverifiedStoreWarning` (same layout; missing chunks read as background, as before).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.core.sync import sync

from ips.errors import StoreError
from ips.format import checksums
from ips.format import location as loc
from ips.format import names as sf

StoreLocation = str | Path | zarr.abc.store.Store


class UnverifiedStoreWarning(UserWarning):
    """A store without a record of what was written (format 1): damage to it cannot be detected."""


_WARNED: set[str] = set()


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


def is_local(location: StoreLocation) -> bool:
    """True for a local path (a `Path`, a string without a URL scheme, or a `file://` URL)."""
    return isinstance(location, (str, Path)) and not loc.is_remote(location)


def describe(location: StoreLocation) -> str:
    """The store's name in messages: its path or URL, or the store object's repr."""
    return str(location) if isinstance(location, (str, Path)) else repr(location)


class IpsStore:
    """A complete ips store, opened read-only (or `r+` to add features).

    Attributes:
        location: what was opened (path, URL or zarr store), for messages and reopening.
        group: the root zarr group.
        spatial_dims, channels, background, spacing, level_downsamples: the `ips` attributes (`spacing`
            and `level_downsamples` are of the store's own levels: array `0` first).
        source_downsample: `(dims,)` source level-0 pixels per store level-0 pixel (`ips.source_level`:
            > 1 for a store made with `--store-from grid`; 1 for a store without the record).
        grids, features: name -> `GridInfo` / `FeatureInfo`.

    Coordinates reported to users (heatmaps, GeoJSON, annotations, the viewer) are the source's level-0
    pixels: `level_downsample` and `source_spacing` map store levels to them.
    """

    def __init__(
        self, location: StoreLocation, group: zarr.Group, marker: dict[str, Any] | None = None
    ) -> None:
        self.location = location
        self.group = group
        self.name = describe(location)
        attrs = group.attrs.asdict().get(sf.IPS_ATTR)
        if not isinstance(attrs, dict):
            raise StoreError(f"{self.name}: not an ips store (no '{sf.IPS_ATTR}' attribute in zarr.json)")
        version = attrs.get("format_version")
        if version not in sf.READABLE_VERSIONS:
            raise StoreError(
                f"{self.name}: store format_version {version!r}; this ips reads versions "
                f"{', '.join(map(str, sf.READABLE_VERSIONS))} (rerun `ips prep --overwrite`)"
            )
        self.format_version = int(version)
        arrays = (marker or {}).get("arrays")
        # array path -> {key: [size, crc32c]} of every written chunk/shard; None: not recorded (format 1)
        self.written: dict[str, dict[str, list[int]]] | None = arrays if isinstance(arrays, dict) else None
        self.attrs: dict[str, Any] = attrs
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
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(
                f"{self.name}: malformed '{sf.IPS_ATTR}' attributes ({type(e).__name__}: {e})"
            ) from None
        # a grid counts once the completion marker lists it (a grid added later may be half-written)
        listed = (marker or {}).get("grids")
        self.complete_grids = (
            set(self.grids) if not isinstance(listed, list) else set(self.grids) & set(listed)
        )

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

    def _array(self, key: str) -> zarr.Array:
        try:
            node = self.group[key]
        except KeyError:
            raise StoreError(f"{self.name}: missing array {key!r}") from None
        if not isinstance(node, zarr.Array):
            raise StoreError(f"{self.name}: {key!r} is not an array")
        return node

    def level(self, level: int) -> zarr.Array:
        """Pyramid level `level`: `(C, Y, X)` or `(C, Z, Y, X)`."""
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
                        "ips prep, since lost); rebuild with `ips prep --overwrite`"
                    )
                if got != [size, crc]:
                    raise StoreError(
                        f"{self.name}: array {key!r} chunk {chunk_key!r}: {got[0]} bytes, crc32c "
                        f"{got[1]:08x}; written {size} bytes, crc32c {crc:08x} (damaged); "
                        "rebuild with `ips prep --overwrite`"
                    )
        try:
            return np.asarray(array[...])
        except Exception as e:  # noqa: BLE001 - a codec failure is damage, named with the array
            raise StoreError(
                f"{self.name}: array {key!r} does not decode ({type(e).__name__}: {e}); "
                "rebuild with `ips prep --overwrite`"
            ) from None

    def _records(self, key: str, record: dict[str, list[int]]) -> list[list[int] | None]:
        """`[size, crc32c]` of each recorded chunk of array `key` as stored now (None: missing); the
        objects of a remote store are fetched at once."""
        if is_local(self.location):
            root = loc.local_path(self.location) / key
            out: list[list[int] | None] = []
            for chunk_key in record:
                try:
                    out.append(checksums.file_record(root / chunk_key))
                except FileNotFoundError:
                    out.append(None)
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


def _partial_hint(location: StoreLocation) -> str:
    """Point at an interrupted `ips prep` output next to a missing local store."""
    path = Path(location)
    partial = next(iter(sorted(path.parent.glob(f".{path.name}{sf.PARTIAL_SUFFIX}*"))), None)
    return f" (a partial conversion exists at {partial}; rerun `ips prep`)" if partial is not None else ""


def _read_marker(group: zarr.Group) -> dict[str, Any] | None:
    """The completion marker's JSON, or None if it is missing; {} if it is not a JSON object."""
    buf = sync((group.store_path / sf.COMPLETE_MARKER).get())
    if buf is None:
        return None
    try:
        marker = json.loads(buf.to_bytes())
    except ValueError:
        return {}
    return marker if isinstance(marker, dict) else {}


def open_store(location: StoreLocation, *, mode: Literal["r", "r+"] = "r") -> IpsStore:
    """Open the complete ips store at `location` (local path first; anything zarr accepts).

    Raises StoreError: missing, not a zarr group, incomplete (no completion marker), not an ips store.
    """
    name = describe(location)
    if is_local(location):
        path = loc.local_path(location)
        if not path.exists():
            raise StoreError(f"{name}: store does not exist{_partial_hint(path)}")
        if not path.is_dir():
            raise StoreError(f"{name}: not a zarr store (not a directory)")
        if not (path / sf.COMPLETE_MARKER).is_file():
            raise StoreError(
                f"{name}: incomplete store (no {sf.COMPLETE_MARKER}); its conversion was "
                "interrupted or is still running: rerun `ips prep`"
            )
    try:
        target = (
            loc.zarr_store(location, read_only=mode == "r") if isinstance(location, (str, Path)) else location
        )
        group = zarr.open_group(target, mode=mode)
        marker = _read_marker(group)
    except (FileNotFoundError, zarr.errors.BaseZarrError) as e:
        gone = loc.is_remote(location) and isinstance(e, FileNotFoundError)
        raise StoreError(
            f"{name}: store does not exist" if gone else f"{name}: not a zarr group ({type(e).__name__}: {e})"
        ) from None
    except Exception as e:  # a remote store: network, credentials, bad URL (obstore's own errors)
        if not loc.is_remote(location):
            raise
        raise StoreError(f"{name}: cannot open ({type(e).__name__}: {_first_line(e)})") from None
    if marker is None:
        raise StoreError(
            f"{name}: incomplete store (no {sf.COMPLETE_MARKER}); its conversion was "
            "interrupted or is still running: rerun `ips prep`"
        )
    store = IpsStore(location, group, marker)
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


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def check_files(store: IpsStore) -> None:
    """The cheap check: every recorded chunk/shard file exists with its recorded size (one stat each).
    Raises StoreError naming the store, the array and the first bad key."""
    assert store.written is not None
    if is_local(store.location):
        root = str(loc.local_path(store.location))
        for array, record in store.written.items():
            base = os.path.join(root, array)
            for key, (size, _) in record.items():
                try:
                    got = os.stat(os.path.join(base, key)).st_size
                except FileNotFoundError:
                    raise StoreError(
                        f"{store.name}: array {array!r} chunk {key!r}: missing (written by ips "
                        "prep, since lost); rebuild with `ips prep --overwrite`"
                    ) from None
                if got != size:
                    raise StoreError(
                        f"{store.name}: array {array!r} chunk {key!r}: {got} bytes, {size} "
                        "written (truncated or changed); rebuild with `ips prep --overwrite`"
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


def verify_store(location: StoreLocation) -> list[str]:
    """Every problem of a store, one line each (empty: intact): what `open_store` checks, then each
    recorded file's crc32c. A store that records no checksums (format 1) is one problem."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnverifiedStoreWarning)
            store = open_store(location)
    except StoreError as e:
        return [str(e)]
    if store.written is None:
        return [
            f"{store.name}: cannot be verified: format {store.format_version} records no checksums "
            "(rebuild with `ips prep --overwrite`)"
        ]
    problems = []
    for array, record in store.written.items():
        for (key, (size, crc)), got in zip(record.items(), store._records(array, record)):
            if got is None:
                problems.append(f"{store.name}: array {array!r} chunk {key!r}: missing")
                continue
            got_size, got_crc = got
            if (got_size, got_crc) != (size, crc):
                problems.append(
                    f"{store.name}: array {array!r} chunk {key!r}: {got_size} bytes, crc32c "
                    f"{got_crc:08x}; written {size} bytes, crc32c {crc:08x} (damaged)"
                )
    return problems
