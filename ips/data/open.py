"""Opening a slide's patch source from a manifest record: the one place that decides between pixels and
precomputed features (`SourceFactory`, built once from `cfg.data`).

A factory built with `reuse=True` (a training run) hands back the source it already opened for the same
store, so a store is opened once per run instead of once per epoch and pass: opening costs ~8 ms
(metadata, grid coordinates), which on a small-slide cohort (Megapixel MNIST: 225 patches per canvas)
is a large share of an epoch. The kept sources are bounded by an estimate of their host memory.
"""

from __future__ import annotations

from collections import OrderedDict

from ips.config import DataConfig, DataMode, ExperimentConfig
from ips.data.context import ContextSource, context_views
from ips.data.manifest import SlideRecord
from ips.data.sources import PatchSource
from ips.data.store import IpsStore

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


class SourceFactory:
    """Opens the patch source of a manifest record: the pixels of `grid`, or the precomputed `features`
    (`mode`), each store read with `read_threads`; `context` > 1 adds each cell's context view
    (`ips.data.context.ContextSource`). `cache`: where opened sources are kept for reuse
    (None: every call opens the store anew)."""

    def __init__(
        self,
        *,
        mode: DataMode = "pixels",
        grid: str = "default",
        features: str = "default",
        read_threads: int = 4,
        context: int = 1,
        cache: SourceCache | None = None,
    ) -> None:
        self.mode = mode
        self.context = context
        self.grid = grid
        self.feature_set = features
        self.read_threads = read_threads
        self.cache = cache

    @classmethod
    def from_config(
        cls, data: DataConfig, *, reuse: bool = False, max_bytes: int | None = None
    ) -> SourceFactory:
        """From `cfg.data` (mode, grid, features, read_threads); `reuse`: keep opened sources (a run:
        the stores do not change under it), at most `max_bytes` (default `DEFAULT_CACHE_BYTES`) of them."""
        cache = SourceCache(DEFAULT_CACHE_BYTES if max_bytes is None else max_bytes) if reuse else None
        return cls(
            mode=data.mode,
            grid=data.grid,
            features=data.features,
            read_threads=data.read_threads,
            context=data.context,
            cache=cache,
        )

    @property
    def features(self) -> bool:
        """True when the sources are precomputed feature vectors, not pixels."""
        return self.mode == "features"

    @property
    def views(self) -> int:
        """Views per item the sources give (1: the patch; 2: the patch and its context)."""
        return 1 if self.features else context_views(self.context)

    def key(self, record: SlideRecord) -> tuple:
        """What identifies an opened source: mode, store, grid or feature set, read threads, context."""
        grid = self.feature_set if self.features else self.grid
        return (self.mode, record.path, grid, self.read_threads, self.context)

    def __call__(self, record: SlideRecord) -> PatchSource:
        """The patch source of one slide (the kept one, where the factory reuses sources)."""
        from ips.data.zarr_source import FeatureSource, ZarrPatchSource

        key = self.key(record)
        source = self.cache.get(key) if self.cache is not None else None
        if source is not None:
            return source
        if self.features:
            source = FeatureSource(record.path, features=self.feature_set)
        else:
            source = ZarrPatchSource(record.path, grid=self.grid, read_threads=self.read_threads)
            if self.context > 1:
                source = ContextSource(source, self.context)
        if self.cache is not None:
            self.cache.put(key, source)
        return source

    def grid_of(self, store: IpsStore) -> str:
        """The grid whose patches this factory's sources stand for (features: the grid they were
        computed on)."""
        return store.feature(self.feature_set).grid if self.features else self.grid


def make_source(record: SlideRecord, cfg: ExperimentConfig) -> PatchSource:
    """One slide's patch source as `cfg.data` says, opened anew (scripts; runs build a `SourceFactory`)."""
    return SourceFactory.from_config(cfg.data)(record)
