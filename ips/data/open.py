"""Opening a slide's patch source from a manifest record, and checking it fits the model: the one place
that decides between pixels and precomputed features.

Within `reuse_sources()` (a training run), `make_source` hands back the source it already opened for the
same store, so a store is opened once per run instead of once per epoch and pass: opening costs ~8 ms
(metadata, grid coordinates), which on a small-slide cohort (Megapixel MNIST: 225 patches per canvas)
is a large share of an epoch. The kept sources are bounded by an estimate of their host memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

from ips.config import ExperimentConfig
from ips.data.manifest import SlideRecord
from ips.data.sources import PatchSource
from ips.data.store import IpsStore
from ips.errors import ConfigError

# measured on Megapixel MNIST stores: ~50 KiB per opened and read source; coordinates 24 B per patch
SOURCE_BYTES = 64 * 1024
PATCH_BYTES = 48
DEFAULT_CACHE_BYTES = 512 * 1024**2


class SourceCache:
    """Opened sources by key, least recently used dropped first once their estimated bytes exceed
    `max_bytes` (estimate: `SOURCE_BYTES + PATCH_BYTES * len(source)` each)."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._kept: OrderedDict[tuple, tuple[PatchSource, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, key: tuple) -> PatchSource | None:
        hit = self._kept.get(key)
        if hit is None:
            return None
        self._kept.move_to_end(key)
        return hit[0]

    def put(self, key: tuple, source: PatchSource) -> None:
        if key in self._kept:  # replaced: its bytes must not be counted twice
            self.bytes -= self._kept.pop(key)[1]
        cost = SOURCE_BYTES + PATCH_BYTES * len(source)
        self._kept[key] = (source, cost)
        self.bytes += cost
        while self.bytes > self.max_bytes and self._kept:
            _, (_, dropped) = self._kept.popitem(last=False)
            self.bytes -= dropped


_active: SourceCache | None = None


@contextmanager
def reuse_sources(max_bytes: int | None = None) -> Iterator[SourceCache]:
    """Within the block, `make_source` reuses the sources it opened (one run: the stores do not change
    under it); at most `max_bytes` (default `DEFAULT_CACHE_BYTES`) of them. Nested blocks share the
    outer cache."""
    global _active
    if _active is not None:
        yield _active
        return
    _active = SourceCache(DEFAULT_CACHE_BYTES if max_bytes is None else max_bytes)
    try:
        yield _active
    finally:
        _active = None


def _source_key(record: SlideRecord, cfg: ExperimentConfig) -> tuple:
    data = cfg.data
    return (
        data.mode,
        record.path,
        data.features if data.mode == "features" else data.grid,
        data.read_threads,
    )


def make_source(record: SlideRecord, cfg: ExperimentConfig) -> PatchSource:
    """The patch source of one slide: pixels from its grid, or its precomputed features."""
    from ips.data.zarr_source import FeatureSource, ZarrPatchSource

    data = cfg.data
    key = _source_key(record, cfg)
    cache = _active
    source = cache.get(key) if cache is not None else None
    if source is not None:
        return source
    if data.mode == "features":
        source = FeatureSource(record.path, features=data.features)
    else:
        source = ZarrPatchSource(record.path, grid=data.grid, read_threads=data.read_threads)
    if cache is not None:
        cache.put(key, source)
    return source


def check_source_fits_model(source: PatchSource, cfg: ExperimentConfig, where: str) -> None:
    """A store whose patches the model cannot take: a clear error before any training."""
    m = cfg.model
    if cfg.data.mode == "features":
        expected: tuple[int, ...] = (m.feature_dim or 0,)
    else:
        expected = (m.in_chans, *([m.patch_size] * m.spatial_dims))
    if tuple(source.patch_shape) != expected:
        raise ConfigError(
            f"{where}: patches have shape {tuple(source.patch_shape)} but the model expects {expected} "
            f"(model.in_chans, model.patch_size, model.spatial_dims{', model.feature_dim' if m.encoder == 'features' else ''})"
        )
    if len(source) == 0:
        raise ConfigError(f"{where}: the grid has no patches (empty tissue mask?)")


def source_grid(store: IpsStore, cfg: ExperimentConfig) -> str:
    """The grid whose patches the source of `cfg` stands for (features: the grid they were computed on)."""
    return store.feature(cfg.data.features).grid if cfg.data.mode == "features" else cfg.data.grid
