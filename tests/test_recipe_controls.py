"""Control runs for the recipe's defaults (ips/config.py): each test runs the same tiny task at the same
seeds, fixed here, twice: once with the library's default, read from its dataclass, and once with the
value it replaced (`REVERTED`, the values before the recipe became the defaults). It asserts that the
default does measurably better on what it was chosen for, over all seeds. Reverting a default makes its
test fail; if the integrator changes a default, the test follows it.

Covered elsewhere: `selection.explore` (tests/test_train.py::test_exploration_finds_patches_that_top_m_alone_never_shows)
and `selection.explore_novel` (tests/test_novelty.py::test_training_exploration_shows_the_rare_patches).
The list of defaults, their reasons and the measured margins of these tests: docs/BENCHMARKS.md,
"Recipe defaults and their control tests".
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from train_fixtures import CHECKER, make_cross_slides, tiny_config

from ips.config import ModelConfig, SelectionConfig
from ips.model.encoders import DEFAULT_NORM
from ips.model.ips_model import build_model
from ips.training.loop import train

# the values the recipe replaced (ips/config.py before the recipe became the library's defaults)
REVERTED = {"model.encoder_norm": "group", "selection.memory_size": 32}


def control_curves(
    out: Path, *, data: dict[str, Any], arms: dict[str, dict[str, dict]], seeds: Sequence[int], epochs: int
) -> dict[str, list[list[float]]]:
    """For each seed, `make_cross_slides(**data)` once, then one `ips train` run per arm on it (`tiny_config`
    with the arm's sections; `train.epochs` and `train.seed` set here, so every arm gets the same seed).
    Returns `{arm: [training loss of each epoch, one list per seed]}`. Use `data` without a validation
    split (`n_val=0`): the property measured is how soon the bag labels are learnt."""
    curves: dict[str, list[list[float]]] = {arm: [] for arm in arms}
    for seed in seeds:
        manifest = make_cross_slides(out / f"data{seed}", seed=seed, **data)
        for arm, sections in arms.items():
            cfg = tiny_config(
                **{**sections, "train": {**sections.get("train", {}), "epochs": epochs, "seed": seed}}
            )
            result = train(
                cfg, manifest=manifest, run_dir=out / f"{arm}{seed}", show_progress=False, log=lambda s: None
            )
            curves[arm].append([row["train_loss"] for row in result.history])
    return curves


def _after_first_epoch(curves: list[list[float]]) -> np.ndarray:
    """How soon the bag labels were learnt, per seed: the mean training loss over epochs 2.. (epoch 1 is
    mostly warm-up)."""
    return np.array([np.mean(c[1:]) for c in curves])


# --- normalisation: `model.encoder_norm` unset = BatchNorm for our encoders -----------------------------


def _contrast(norm: str | None, seed: int) -> float:
    """At initialisation, in training mode: how far the content embeddings of 4 marked patches lie from
    the mean embedding of 60 blank ones, over that mean's norm (one bag of 64 8-px patches, `ips_cnn_small`,
    the shipped configs' CPU encoder). A mark that the aggregator's LayerNorm cannot tell from the blank
    patches gives the bag label no gradient to start the encoder with."""
    rng = np.random.default_rng(seed)
    patches = np.full((64, 1, 8, 8), 80, np.uint8)  # blank: the background of a sparse image
    marked = np.zeros(64, bool)
    marked[rng.choice(64, 4, replace=False)] = True
    patches[marked, 0] = CHECKER
    cfg = ModelConfig(
        encoder="ips_cnn_small", encoder_norm=norm, in_chans=1, patch_size=8, d_model=32, n_heads=4, d_mlp=32
    )
    torch.manual_seed(seed)
    model = build_model(cfg).train()
    with torch.no_grad():
        emb = model.embed_content(torch.from_numpy(patches))
    blank = emb[torch.from_numpy(~marked)].mean(0)
    return float((emb[torch.from_numpy(marked)] - blank).norm(dim=1).mean() / blank.norm())


def test_default_norm_makes_rare_patches_stand_out_at_initialisation():
    """The mechanism (docs/notes/2026-12-training-log.md, Megapixel MNIST, "Why GroupNorm did not learn at
    all"): with the default, a marked patch's embedding lies further from the blank ones' than 4 times
    GroupNorm's distance (each patch normalised on its own), in every one of seeds 0-3."""
    default = ModelConfig().encoder_norm
    seeds = range(4)
    ours = [_contrast(default, s) for s in seeds]
    control = [_contrast(REVERTED["model.encoder_norm"], s) for s in seeds]
    print(f"contrast: default {np.round(ours, 2)}, GroupNorm {np.round(control, 2)}")
    assert all(d > 4 * c for d, c in zip(ours, control)), (ours, control)


@pytest.mark.slow
@pytest.mark.learning
def test_default_norm_lets_bag_labels_teach_a_fresh_encoder_sooner(tmp_path):
    """Why BatchNorm became the default: bag labels teach a fresh encoder far sooner (docs/notes/
    2026-12-training-log.md: the small-object task's old defaults, GroupNorm and no exploration, stayed at
    chance; Megapixel MNIST did not learn with GroupNorm). `make_cross_slides(marks=3)` (3 checkerboard
    patches among 64 on positive slides, 24 training slides), `ips_cnn_tiny` from scratch, M 4, the
    library's exploration, 4 epochs at lr 3e-3 (the tiny task's), seeds 0-3. The default normalisation
    against GroupNorm, all else equal: the training loss falls sooner (mean over epochs 2-4) on average
    by at least 0.05, and in at least 3 of the 4 seeds."""
    default = ModelConfig().encoder_norm
    explore = {"explore": SelectionConfig().explore}
    curves = control_curves(
        tmp_path,
        data={"n_train": 24, "n_val": 0, "marks": 3},
        arms={
            "default": {"model": {"encoder_norm": default}, "selection": explore},
            "control": {"model": {"encoder_norm": REVERTED["model.encoder_norm"]}, "selection": explore},
        },
        seeds=range(4),
        epochs=4,
    )
    ours, control = _after_first_epoch(curves["default"]), _after_first_epoch(curves["control"])
    print(f"training loss, epochs 2-4: default {ours.round(3)}, GroupNorm {control.round(3)}")
    assert control.mean() - ours.mean() >= 0.05 and (ours < control).sum() >= 3, (ours, control)


# --- memory size: `selection.memory_size` -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.learning
def test_default_memory_size_does_not_dilute_the_patch_that_matters(tmp_path):
    """Why the recipe lowered M from 32: more patches in the pooled attention dilute the one that matters
    (docs/notes/2026-12-training-log.md, small objects, second look: M 32 of 256 patches stayed near chance).
    `make_cross_slides(size=128, marks=2)` (2 checkerboard patches among 256 on positive slides, 24
    training slides), `ips_cnn_tiny` from scratch with the library's normalisation and exploration, I 64,
    6 epochs at lr 3e-3, seeds 0-2. M at its default against M 32: the training loss falls sooner (mean
    over epochs 2-6) on average by at least 0.04 and in at least 2 of the 3 seeds."""
    default = SelectionConfig().memory_size
    arms = {
        arm: {
            "model": {"encoder_norm": ModelConfig().encoder_norm},
            "selection": {"memory_size": m, "iter_size": 64, "explore": SelectionConfig().explore},
        }
        for arm, m in (("default", default), ("control", REVERTED["selection.memory_size"]))
    }
    curves = control_curves(
        tmp_path,
        data={"n_train": 24, "n_val": 0, "size": 128, "marks": 2},
        arms=arms,
        seeds=range(3),
        epochs=6,
    )
    ours, control = _after_first_epoch(curves["default"]), _after_first_epoch(curves["control"])
    print(f"training loss, epochs 2-6: M {default} {ours.round(3)}, M 32 {control.round(3)}")
    assert control.mean() - ours.mean() >= 0.04 and (ours < control).sum() >= 2, (ours, control)


def test_reverted_values_differ_from_the_defaults():
    """A control equal to the default would measure nothing: the reverted values are not the defaults
    (when the integrator moves a default onto a reverted value, the control tests fail, as they should)."""
    assert (ModelConfig().encoder_norm or DEFAULT_NORM) != REVERTED["model.encoder_norm"]
    assert SelectionConfig().memory_size != REVERTED["selection.memory_size"]
