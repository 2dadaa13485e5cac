"""End to end through the CLI: `ips train` on a manifest with `time` and `event` columns for a survival
task (and a regression task beside it), then `ips predict` and `ips heatmap` on the checkpoint."""

from __future__ import annotations

import csv
import json

import numpy as np
import torch
import yaml

from ips.cli.main import main
from tests.train_fixtures import TINY, make_cross_slides


def _read(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _survival_manifest(tmp_path):
    """The cross slides with a survival label (a marked slide dies early) and a regression label (the
    mark count), in the manifest's `time`, `event` and `score` columns."""
    manifest = make_cross_slides(tmp_path / "data", n_train=8, n_val=4, seed=1)
    rows = _read(manifest)
    rng = np.random.default_rng(0)
    for i, r in enumerate(rows):
        marked = int(r.pop("label"))
        r["time"] = f"{(2.0 if marked else 10.0) + rng.uniform(0, 1):.3f}"
        r["event"] = "0" if i % 4 == 3 else "1"
        r["score"] = str(float(marked))
    out = tmp_path / "data" / "survival.csv"
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def _train(cfg_path, cfg: dict, manifest):
    """`ips train` with `cfg` (written to `cfg_path`) on `manifest`, one thread, into `run` beside the
    config; returns the run folder."""
    cfg_path.write_text(yaml.safe_dump(cfg))
    run = cfg_path.parent / "run"
    threads = torch.get_num_threads()
    try:
        args = ["train", "--config", str(cfg_path), "--manifest", str(manifest), "--out", str(run), "--quiet"]
        assert main([*args, "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    return run


def test_train_predict_heatmap_with_time_and_event_columns(tmp_path, capsys):
    manifest = _survival_manifest(tmp_path)
    cfg = {**TINY, "model": {**TINY["model"], "tasks": [{"name": "os", "kind": "survival"}]}}
    cfg["model"]["tasks"].append({"name": "score", "kind": "regression", "loss": "huber"})
    cfg["train"] = {**TINY["train"], "epochs": 2, "monitor": "val_os/c_index", "micro_batch_size": 2}
    run = _train(tmp_path / "surv.yaml", cfg, manifest)
    assert "the Cox risk set is the 2 slides of a micro-batch" in capsys.readouterr().out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for key in ("val_os/c_index", "val_os/events", "val_score/mae", "val_score/r2", "val_score/pearson"):
        assert key in rows[-1], key
    assert 0.0 <= rows[-1]["val_os/c_index"] <= 1.0
    assert rows[-1]["val_os/events"] == 3.0  # val slides 8..11: slide 11 is censored
    ckpt = run / "checkpoints" / "best.pt"
    assert ckpt.is_file()

    pred = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(ckpt), "--manifest", str(manifest), "--out", str(pred)]) == 0
    table = _read(pred / "predictions.csv")
    assert {r["task"] for r in table} == {"os", "score"} and len(table) == 2 * 12
    labels = {r["slide_id"]: r for r in _read(manifest)}
    for r in table:
        float(r["prediction"])  # a number for both kinds
        if r["task"] == "os":
            assert r["time"] == repr(float(labels[r["slide_id"]]["time"]))
            assert r["event"] == labels[r["slide_id"]]["event"] and r["label"] == ""
        else:
            assert float(r["label"]) == float(labels[r["slide_id"]]["score"]) and r["time"] == ""
    metrics = json.loads((pred / "metrics.json").read_text())["metrics"]
    assert "os/c_index" in metrics and "score/r2" in metrics

    store = manifest.parent / "s000.zarr"
    assert main(["heatmap", "--checkpoint", str(ckpt), str(store), "--out", str(tmp_path / "hm")]) == 0
    geo = json.loads((tmp_path / "hm" / "s000" / "heatmap.geojson").read_text())
    measured = geo["features"][0]["properties"]["measurements"]
    assert any("os" in k for k in measured) and any("score" in k for k in measured)
    capsys.readouterr()


def test_discrete_time_survival_trains_with_bins_from_the_training_times(tmp_path, capsys):
    """`loss: discrete`: the run's config holds the time bins, the quantiles of the training slides'
    event times (numpy on the manifest); validation reports the C-index; predict writes the risk."""
    manifest = _survival_manifest(tmp_path)
    task = {"name": "os", "kind": "survival", "loss": "discrete", "num_classes": 3}
    cfg = {**TINY, "model": {**TINY["model"], "tasks": [task]}}
    cfg["train"] = {**TINY["train"], "epochs": 1, "monitor": "val_os/c_index", "micro_batch_size": 2}
    run = _train(tmp_path / "disc.yaml", cfg, manifest)
    assert "Cox risk set" not in capsys.readouterr().out
    rows = _read(manifest)
    train_events = [float(r["time"]) for r in rows if r["split"] == "train" and r["event"] == "1"]
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]["tasks"][0]
    np.testing.assert_allclose(saved["time_bins"], np.quantile(train_events, [1 / 3, 2 / 3]))
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= last["val_os/c_index"] <= 1.0
    pred = tmp_path / "pred"
    ckpt = run / "checkpoints" / "best.pt"
    assert main(["predict", "--checkpoint", str(ckpt), "--manifest", str(manifest), "--out", str(pred)]) == 0
    table = _read(pred / "predictions.csv")
    assert len(table) == 12 and all(-3.0 <= float(r["prediction"]) <= 0.0 for r in table)
