"""Opening a slide's patch source from a manifest record, and checking it fits the model: the one place
that decides between pixels and precomputed features."""

from __future__ import annotations

from ips.config import ExperimentConfig
from ips.data.manifest import SlideRecord
from ips.data.sources import PatchSource
from ips.data.store import IpsStore
from ips.errors import ConfigError


def make_source(record: SlideRecord, cfg: ExperimentConfig) -> PatchSource:
    """The patch source of one slide: pixels from its grid, or its precomputed features."""
    from ips.data.zarr_source import FeatureSource, ZarrPatchSource

    if cfg.data.mode == "features":
        return FeatureSource(record.path, features=cfg.data.features)
    return ZarrPatchSource(record.path, grid=cfg.data.grid, read_threads=cfg.data.read_threads)


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
