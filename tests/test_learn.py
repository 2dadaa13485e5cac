"""`ips bench learn`: the JSON contract, the narrowing options, the heatmap metric on known numbers, and one
tiny real run through the documented commands."""

import json
from pathlib import Path

import numpy as np
import pytest

import ips.bench.learn as learn
from ips.bench.learn import ROW_KEYS, LearnSettings, patch_truth_auroc, run_learn
from ips.cli.main import main

REPO = Path(__file__).resolve().parents[1]


def test_heatmap_metric_leaves_slivers_out_and_counts_distractors_as_negatives():
    attention = np.array([0.9, 0.8, 0.1, 0.7, 0.2, 0.3])
    share = np.array([0.6, 0.3, 0.05, 0.0, 0.0, 0.0])
    # positives: shares >= 0.25 (0.9, 0.8); the 0.05 sliver is left out; negatives 0.7, 0.2, 0.3:
    # all 6 pairs ordered right
    assert patch_truth_auroc(attention, share) == 1.0
    attention[3] = 0.85  # a distractor patch above one target patch: 5 of 6 pairs
    assert patch_truth_auroc(attention, share) == pytest.approx(5 / 6)


def test_heatmap_metric_small_target_uses_half_its_best_share():
    # a lesion never fills a quarter of a patch: positives are the patches with >= half its best share
    share = np.array([0.12, 0.07, 0.02, 0.0, 0.0])
    attention = np.array([0.5, 0.4, 0.9, 0.1, 0.45])
    # positives 0.5 (0.12) and 0.4 (0.07 >= 0.06); the 0.02 sliver out; negatives 0.1, 0.45 -> 3 of 4
    assert patch_truth_auroc(attention, share) == pytest.approx(3 / 4)
    assert np.isnan(patch_truth_auroc(attention, np.zeros(5)))


def test_cli_writes_the_json_contract_and_narrows_families_and_seeds(tmp_path, monkeypatch):
    calls = []

    def fake_run_one(key, seed, settings):
        calls.append((key, seed))
        return {
            "family": key,
            "seed": seed,
            "test_accuracy": 1.0,
            "heatmap_auroc": 0.5 + seed / 10,
            "cpu_minutes": 2.5,
            "commands": ["ips train ..."],
        }

    monkeypatch.setattr(learn, "run_one", fake_run_one)
    out = tmp_path / "learn.json"
    rc = main(
        ["bench", "learn", "--families", "a,e", "--seeds", "0,1", "--out", str(tmp_path), "--json", str(out)]
    )
    assert rc == 0
    assert calls == [("a", 0), ("a", 1), ("e", 0), ("e", 1)]
    result = json.loads(out.read_text())
    assert [tuple(r) for r in result["rows"]] == [ROW_KEYS] * 4
    assert ROW_KEYS == ("family", "seed", "test_accuracy", "heatmap_auroc", "cpu_minutes")
    assert result["rows"][3] == {
        "family": "e",
        "seed": 1,
        "test_accuracy": 1.0,
        "heatmap_auroc": 0.6,
        "cpu_minutes": 2.5,
    }
    assert result["runs"][0]["commands"] == ["ips train ..."]


def test_cli_refuses_an_unknown_family(tmp_path, capsys):
    assert main(["bench", "learn", "--families", "a,z", "--out", str(tmp_path)]) == 2
    assert "unknown family 'z'" in capsys.readouterr().err


@pytest.mark.slow
def test_a_tiny_matrix_runs_the_documented_commands(tmp_path):
    settings = LearnSettings(
        families=("d",), seeds=(3,), out=tmp_path, configs=REPO / "configs", n_slides=10, epochs=1
    )
    result = run_learn(settings)
    (row,) = result["rows"]
    assert row["family"] == "d" and row["seed"] == 3
    assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["heatmap_auroc"] <= 1.0
    assert row["cpu_minutes"] > 0
    (run,) = result["runs"]
    cmds = run["commands"]
    assert cmds[0].startswith(f"ips train --config {REPO / 'configs' / 'demo.yaml'} --manifest ")
    assert cmds[0].endswith("train.seed=3 train.epochs=1")
    assert cmds[1].startswith("ips predict --checkpoint ") and "--split test" in cmds[1]
    assert cmds[2].startswith("ips heatmap --checkpoint ")
    assert set(run["cpu_minutes_by_step"]) == {"train", "predict", "heatmap"}
    assert (
        json.loads((tmp_path / "d_seed3" / "result.json").read_text())["test_accuracy"]
        == row["test_accuracy"]
    )


def test_cli_asks_for_digits_where_a_family_needs_them(tmp_path, capsys):
    assert main(["bench", "learn", "--families", "d,b", "--out", str(tmp_path)]) == 2
    assert "--digits: families b need an MNIST CSV" in capsys.readouterr().err
