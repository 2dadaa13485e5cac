"""The recipe's defaults (ips.config) against a control run with the feature reverted, same data and seeds
(fixed here before measuring, all of them counted): a default that stops helping fails its test."""

import pytest
from train_fixtures import TINY, make_cross_slides, tiny_config

from ips.config import SelectionConfig
from ips.training.loop import train

SEEDS = (0, 1, 2)
LEARNED = 0.8  # final validation accuracy; chance is 0.5 (balanced)


def learned(cfg, manifest, run_dir) -> bool:
    result = train(cfg, manifest=manifest, run_dir=run_dir, show_progress=False, log=lambda s: None)
    return result.history[-1]["val_label/accuracy"] >= LEARNED


@pytest.mark.slow
@pytest.mark.learning
def test_default_exploration_finds_what_top_m_alone_never_shows(tmp_path):
    """One bright cross among 64 patches: a fresh encoder ranks the extreme patch consistently (often last),
    so top-M alone (the paper's IPS, `explore: 0`) rarely trains on it; the default explore slots show it.
    Measured (docs/BENCHMARKS.md, "What it takes for top-M to learn at all"): 3 of 3 seeds against 1 of 3."""
    manifest = make_cross_slides(tmp_path / "data", n_train=24, n_val=12, seed=1, mark="cross")
    default = SelectionConfig().explore
    assert default > 0
    on = off = 0
    for seed in SEEDS:
        for explore in (default, 0.0):
            cfg = tiny_config(
                model={**TINY["model"], "encoder": "ips_cnn_small", "encoder_norm": "group"},
                selection={"memory_size": 8, "explore": explore},
                train={"epochs": 15, "batch_size": 4, "lr": 3e-3, "warmup_epochs": 1, "seed": seed},
                data={"augment": True, "color_jitter": 0.0},
            )
            ok = learned(cfg, manifest, tmp_path / f"run_{explore}_{seed}")
            on, off = on + (ok and explore == default), off + (ok and explore == 0.0)
    assert on >= 2 and on > off, (on, off)
