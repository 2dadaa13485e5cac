"""Open an ips store (docs/FORMAT.md) for reading: check it is complete, parse its `ips` attributes.

Every problem with a store is a `StoreError` whose one-line message names the store and what is wrong,
so a bad manifest row or a half-written store fails before training starts, not deep inside a read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.core.sync import sync

from ips.errors import StoreError
from ips.format import names as sf

StoreLocation = str | Path | zarr.abc.store.Store



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
    """True for a local path (a `Path`, or a string without a URL scheme)."""
    return isinstance(location, Path) or (isinstance(location, str) and "://" not in location)


def describe(location: StoreLocation) -> str:
    """The store's name in messages: its path or URL, or the store object's repr."""
    return str(location) if isinstance(location, (str, Path)) else repr(location)


class IpsStore:
    """A complete ips store, opened read-only (or `r+` to add features).

    Attributes:
        location: what was opened (path, URL or zarr store), for messages and reopening.
        group: the root zarr group.
        spatial_dims, channels, background, spacing, level_downsamples: the `ips` attributes.
        grids, features: name -> `GridInfo` / `FeatureInfo`.
    """

    def __init__(self, location: StoreLocation, group: zarr.Group, marker: dict[str, Any] | None = None) -> None:
        self.location = location
        self.group = group
        self.name = describe(location)
        attrs = group.attrs.asdict().get(sf.IPS_ATTR)
        if not isinstance(attrs, dict):
            raise StoreError(f"{self.name}: not an ips store (no '{sf.IPS_ATTR}' attribute in zarr.json)")
        version = attrs.get("format_version")
        if version != sf.FORMAT_VERSION:
            raise StoreError(f"{self.name}: store format_version {version!r}; this ips reads "
                             f"version {sf.FORMAT_VERSION} (rerun `ips prep`)")
        self.attrs: dict[str, Any] = attrs
        try:
            self.spatial_dims = int(attrs["spatial_dims"])
            self.channels = int(attrs["channels"])
            self.background = attrs.get("background", 0)
            self.spacing = attrs.get("spacing")
            self.level_downsamples = [tuple(d) for d in attrs.get("level_downsamples", [])]
            self.grids = {
                name: GridInfo(name, int(g["level"]), tuple(int(v) for v in g["patch_size"]),
                               tuple(int(v) for v in g["stride"]), float(g.get("min_tissue", 0.0)),
                               int(g["n_patches"]))
                for name, g in attrs.get("grids", {}).items()
            }
            self.features = {
                name: FeatureInfo(name, str(f.get("grid", sf.DEFAULT_GRID)), str(f.get("encoder", "")),
                                  int(f["dim"]))
                for name, f in (attrs.get("features") or {}).items()
            }
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{self.name}: malformed '{sf.IPS_ATTR}' attributes ({type(e).__name__}: {e})") from None
        # a grid counts once the completion marker lists it (a grid added later may be half-written)
        listed = (marker or {}).get("grids")
        self.complete_grids = set(self.grids) if not isinstance(listed, list) else set(self.grids) & set(listed)

    def __repr__(self) -> str:
        return f"IpsStore({self.name}, dims={self.spatial_dims}, grids={list(self.grids)})"

    def grid(self, name: str = sf.DEFAULT_GRID) -> GridInfo:
        valid = ", ".join(sorted(self.complete_grids)) or "none"
        if name in self.grids and name not in self.complete_grids:
            raise StoreError(f"{self.name}: grid {name!r} is incomplete (not listed in {sf.COMPLETE_MARKER}; "
                             f"rerun `ips prep`); complete grids: {valid}")
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

    def coords(self, grid: str = sf.DEFAULT_GRID) -> np.ndarray:
        """Grid coords, int64 `(N, spatial_dims)` (top-left corners, pixels of the grid's level)."""
        info = self.grid(grid)
        coords = np.asarray(self._array(f"{sf.GRIDS_GROUP}/{grid}/{sf.COORDS_ARRAY}")[...], dtype=np.int64)
        if coords.shape != (info.n_patches, self.spatial_dims):
            raise StoreError(f"{self.name}: grid {grid!r} coords have shape {coords.shape}, expected "
                             f"({info.n_patches}, {self.spatial_dims})")
        return coords

    def embeddings(self, name: str = sf.DEFAULT_GRID) -> zarr.Array:
        """Feature vectors `(N, F)` of feature set `name`."""
        self.feature(name)
        return self._array(f"{sf.FEATURES_GROUP}/{name}/{sf.EMBEDDINGS_ARRAY}")


def _partial_hint(location: StoreLocation) -> str:
    """Point at an interrupted `ips prep` output next to a missing local store."""
    path = Path(location)
    partial = path.with_name(f".{path.name}{sf.PARTIAL_SUFFIX}")
    return f" (a partial conversion exists at {partial}; rerun `ips prep`)" if partial.exists() else ""


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
        path = Path(location)
        if not path.exists():
            raise StoreError(f"{name}: store does not exist{_partial_hint(path)}")
        if not path.is_dir():
            raise StoreError(f"{name}: not a zarr store (not a directory)")
        if not (path / sf.COMPLETE_MARKER).is_file():
            raise StoreError(f"{name}: incomplete store (no {sf.COMPLETE_MARKER}); its conversion was "
                             "interrupted or is still running: rerun `ips prep`")
    try:
        group = zarr.open_group(location, mode=mode)
    except (FileNotFoundError, zarr.errors.BaseZarrError) as e:
        raise StoreError(f"{name}: not a zarr group ({type(e).__name__}: {e})") from None
    marker = _read_marker(group)
    if marker is None:
        raise StoreError(f"{name}: incomplete store (no {sf.COMPLETE_MARKER}); its conversion was "
                         "interrupted or is still running: rerun `ips prep`")
    return IpsStore(location, group, marker)
