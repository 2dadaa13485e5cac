"""Opened sources reused within a training run: once per store, bounded, and the same training result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_fixtures import TINY, make_cross_slides, tiny_config

import ips.data.open as open_mod
from ips.data.manifest import SlideRecord, read_manifest
from ips.data.open import SourceCache, SourceFactory, make_source
from ips.data.zarr_source import ZarrPatchSource
from ips.model.checkpoint import load_checkpoint
from ips.training.loop import train


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    return make_cross_slides(tmp_path_factory.mktemp("cache"), n_train=6, n_val=3)


def _records(manifest: Path) -> list[SlideRecord]:
    return read_manifest(manifest, tiny_config().model.tasks)


def test_a_reusing_factory_opens_each_store_once(slides):
    cfg = tiny_config()
    a, b = _records(slides)[:2]
    plain = SourceFactory.from_config(cfg.data)
    assert plain.cache is None and plain(a) is not plain(a)
    assert make_source(a, cfg) is not make_source(a, cfg)  # one-off sources: never kept
    reusing = SourceFactory.from_config(cfg.data, reuse=True)
    first = reusing(a)
    assert reusing(a) is first and reusing(b) is not first
    assert len(reusing.cache) == 2
    other_grid = SourceFactory.from_config(tiny_config(data={"grid": "other"}).data)
    assert reusing.cache.get(other_grid.key(a)) is None  # a different grid is a different source
    assert SourceFactory.from_config(cfg.data, reuse=True)(a) is not first  # one cache per factory


def test_lru_bound_on_estimated_bytes(slides):
    cfg = tiny_config()
    records = _records(slides)
    one = open_mod.SOURCE_BYTES + open_mod.PATCH_BYTES * len(make_source(records[0], cfg))
    cache = SourceCache(max_bytes=2 * one)
    for r in records[:4]:
        cache.put(SourceFactory.from_config(cfg.data).key(r), make_source(r, cfg))
        assert cache.bytes <= 2 * one
    assert len(cache) == 2
    keys = [SourceFactory.from_config(cfg.data).key(r) for r in records[:4]]
    assert cache.get(keys[0]) is None and cache.get(keys[1]) is None  # oldest dropped first
    assert cache.get(keys[2]) is not None and cache.get(keys[3]) is not None
    assert SourceCache(max_bytes=0).bytes == 0
    again = SourceCache()
    again.put(keys[0], make_source(records[0], cfg))
    again.put(keys[0], make_source(records[0], cfg))
    assert len(again) == 1 and again.bytes == one  # a replaced source is counted once
    zero = SourceCache(max_bytes=0)
    zero.put(keys[0], make_source(records[0], cfg))
    assert len(zero) == 0 and zero.bytes == 0


def test_training_opens_each_store_once_and_learns_the_same(tmp_path, slides, monkeypatch):
    """Two epochs with validation and BatchNorm recalibration: every store is opened once, and the run
    equals one that opens the stores afresh each time (no cache), weight for weight."""
    cfg = tiny_config(
        model={**TINY["model"], "encoder_norm": "batch"},
        selection={"explore": 0.25},
        train={"epochs": 2, "bn_recalibration_slides": 3},
    )
    opened: list[str] = []
    real_init = ZarrPatchSource.__init__

    def counting_init(self, location, *args, **kwargs):
        opened.append(str(location))
        real_init(self, location, *args, **kwargs)

    monkeypatch.setattr(ZarrPatchSource, "__init__", counting_init)
    cached = train(cfg, manifest=slides, run_dir=tmp_path / "cached", show_progress=False, log=lambda s: None)
    assert len(opened) == len(set(opened)) == 9, "each of the 9 stores opened exactly once"

    opened.clear()
    monkeypatch.setattr(open_mod, "DEFAULT_CACHE_BYTES", 0)  # the cache keeps nothing: a fresh open each time
    fresh = train(cfg, manifest=slides, run_dir=tmp_path / "fresh", show_progress=False, log=lambda s: None)
    assert len(opened) > 2 * 9
    a = load_checkpoint(tmp_path / "cached" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "fresh" / "checkpoints" / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(cached.history) == strip(fresh.history)
