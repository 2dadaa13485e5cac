"""The data layer's name for the store opener: `ips.format.store` owns the store contract (names, marker,
commit, open, verify); this module keeps `from ips.data.store import open_store, IpsStore` working."""

from __future__ import annotations

from ips.errors import StoreError
from ips.format.store import (
    FeatureInfo,
    GridInfo,
    IpsStore,
    StoreLocation,
    UnverifiedStoreWarning,
    check_files,
    describe,
    is_local,
    open_store,
    verify_store,
)

__all__ = [
    "FeatureInfo",
    "GridInfo",
    "IpsStore",
    "StoreError",
    "StoreLocation",
    "UnverifiedStoreWarning",
    "check_files",
    "describe",
    "is_local",
    "open_store",
    "verify_store",
]
