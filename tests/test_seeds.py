"""Seed variance: the Student-t interval on known numbers, the summary of several runs, `ips train --seeds`."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from train_fixtures import TINY, make_cross_slides

from ips.cli.main import main
from ips.config import ConfigError
from ips.training.restarts import GuardedRun, best_row, read_rows
from ips.training.seeds import format_table, parse_seeds, seed_metrics, spread, summarize

P = 0.975  # the upper quantile of a two-sided 95% interval


# closed forms of the Student-t quantile, independent of scipy (Hill 1970; listed in the literature of
# the t distribution for 1, 2 and 4 degrees of freedom)
def t_quantile_1(p: float) -> float:
    return math.tan(math.pi * (p - 0.5))


def t_quantile_2(p: float) -> float:
    return math.sqrt(2) * (p - 0.5) / math.sqrt(p * (1 - p))


def t_quantile_4(p: float) -> float:
    a = 4 * p * (1 - p)
    q = math.cos(math.acos(math.sqrt(a)) / 3) / math.sqrt(a)
    return math.copysign(2 * math.sqrt(q - 1), p - 0.5)


def test_closed_forms_match_printed_tables():
    """The oracles themselves, against the 3-decimal values every t table prints."""
    assert round(t_quantile_1(P), 3) == 12.706
    assert round(t_quantile_2(P), 3) == 4.303
    assert round(t_quantile_4(P), 3) == 2.776


def test_interval_of_one_two_three():
    """mean 2, sd 1 (n - 1), half-width t(0.975, 2) / sqrt(3) = 4.3026527297... / 1.7320508... = 2.4841377..."""
    s = spread([1.0, 2.0, 3.0])
    assert s.n == 3 and s.mean == 2.0 and s.sd == pytest.approx(1.0, abs=1e-15)
    half = t_quantile_2(P) / math.sqrt(3)
    assert half == pytest.approx(2.4841377117503, abs=1e-12)
    assert s.half_width == pytest.approx(half, rel=1e-12)
    assert (s.low, s.high) == (pytest.approx(2 - half, rel=1e-12), pytest.approx(2 + half, rel=1e-12))


@pytest.mark.parametrize(
    ("values", "quantile"),
    [([0.8, 0.9], t_quantile_1), ([0.91, 0.95, 0.97, 0.99, 1.0], t_quantile_4)],
)
def test_interval_at_one_and_four_degrees_of_freedom(values, quantile):
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    s = spread(values)
    assert s.mean == pytest.approx(mean, rel=1e-12) and s.sd == pytest.approx(sd, rel=1e-12)
    assert s.half_width == pytest.approx(quantile(P) * sd / math.sqrt(n), rel=1e-10)


def test_one_value_has_no_interval_and_nan_is_left_out():
    s = spread([0.93])
    assert (s.n, s.mean, s.sd, s.low, s.high, s.half_width) == (1, 0.93, None, None, None, None)
    assert spread([]).n == 0 and spread([]).mean is None
    s = spread([1.0, math.nan, 3.0])
    assert s.n == 2 and s.mean == 2.0 and s.sd == pytest.approx(math.sqrt(2))


def test_summary_and_table():
    per_seed = {
        0: {"val_label/auroc": 1.0, "train_loss": 0.2, "restarts": 0.0},
        1: {"val_label/auroc": 2.0, "train_loss": 0.4, "restarts": 1.0},
        2: {"val_label/auroc": 3.0, "train_loss": math.nan, "restarts": 0.0},
    }
    out = summarize(per_seed)
    assert list(out) == ["val_label/auroc", "train_loss", "restarts"]  # validation, training, the rest
    auroc = out["val_label/auroc"]
    assert auroc["n"] == 3 and auroc["mean"] == 2.0 and auroc["sd"] == pytest.approx(1.0)
    half = t_quantile_2(P) / math.sqrt(3)
    assert auroc["interval"] == [pytest.approx(2 - half), pytest.approx(2 + half)]
    assert auroc["values"] == {"0": 1.0, "1": 2.0, "2": 3.0}
    loss = out["train_loss"]  # NaN at seed 2: two values, t at 1 degree of freedom
    assert loss["n"] == 2 and loss["values"]["2"] is None
    assert loss["half_width"] == pytest.approx(t_quantile_1(P) * math.sqrt(0.02) / math.sqrt(2))
    table = format_table(out).splitlines()
    assert table[0].split() == ["metric", "mean", "+-", "sd", "95%", "interval", "(t)", "n"]
    assert table[1].split() == [
        "val_label/auroc",
        "2.0000",
        "+-",
        "1.0000",
        f"[{2 - half:.4f},",
        f"{2 + half:.4f}]",
        "3",
    ]
    one = summarize({7: {"val_label/auroc": 0.9}})
    assert one["val_label/auroc"]["interval"] is None and one["val_label/auroc"]["note"] == "n=1: no interval"
    assert "none (n=1)" in format_table(one)
    json.dumps(out, allow_nan=False)  # valid JSON: no NaN anywhere


def test_seed_metrics_are_the_best_epochs():
    history = [
        {"epoch": 1, "lr": 1e-3, "seconds": 2.0, "train_loss": 0.7, "val_loss": 0.69, "val_label/auroc": 0.5},
        {"epoch": 2, "lr": 1e-3, "seconds": 3.0, "train_loss": 0.5, "val_loss": 0.40, "val_label/auroc": 0.9},
        {
            "epoch": 3,
            "lr": 1e-3,
            "seconds": 2.0,
            "train_loss": 0.3,
            "val_loss": 0.45,
            "val_label/auroc": 0.95,
        },
    ]
    run = GuardedRun(Path("run"), history, "val_loss", attempts=[{}, {}], kept=1, seconds=600.0)
    m = seed_metrics(run)
    assert m == {
        "train_loss": 0.5,
        "val_loss": 0.40,
        "val_label/auroc": 0.9,
        "best_epoch": 2.0,
        "restarts": 1.0,
        "train_minutes": 10.0,
    }


@pytest.mark.parametrize("text", ["", "0,a", "1,1", "0,-2", "0;1"])
def test_bad_seeds(text):
    with pytest.raises(ConfigError, match="--seeds"):
        parse_seeds(text)


def test_cli_seeds_trains_each_and_summarises(tmp_path, capsys):
    manifest = make_cross_slides(tmp_path / "data", n_train=8, n_val=4)
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "epochs": 2}}))
    out = tmp_path / "out"
    args = ["train", "--config", str(cfg_path), "--manifest", str(manifest), "--out", str(out), "--quiet"]
    assert main([*args, "--seeds", "3,5"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [3, 5]
    # each seed's run is a plain run at that seed; the summary is built from their best epochs
    values = {}
    for seed in (3, 5):
        run = out / f"seed_{seed}"
        assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == seed
        assert (run / "checkpoints" / "best.pt").is_file()
        values[seed] = best_row(read_rows(run), "val_loss")["val_label/auroc"]
    auroc = summary["metrics"]["val_label/auroc"]
    v = np.array([values[3], values[5]])
    assert auroc["mean"] == pytest.approx(v.mean()) and auroc["sd"] == pytest.approx(v.std(ddof=1))
    assert auroc["half_width"] == pytest.approx(t_quantile_1(P) * v.std(ddof=1) / math.sqrt(2))
    assert "val_label/auroc" in printed and "summary.json" in printed
    assert main([*args, "--seeds", "3,x"]) == 2
    assert "--seeds: expected integers" in capsys.readouterr().err
