"""`ips predict`: predictions.csv per the contract, metrics.json from known labels, per-store failures
(exit 1, the rest still predicted), bad usage (exit 2), and the same numbers as the training loop's."""

import csv
import json

import numpy as np
import pytest
import torch
from inference_fixtures import BINARY, MULTICLASS, MULTILABEL, make_store, tiny_cfg, write_checkpoint
from train_fixtures import make_cross_slides, tiny_config

from ips.cli.main import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    stores = [make_store(root / "stores", f"s{i}", size=(64, 48), patch=16, seed=i) for i in range(4)]
    cfg = tiny_cfg(tasks=[BINARY, MULTICLASS, MULTILABEL], memory_size=3, iter_size=5)
    ckpt = write_checkpoint(root / "model.pt", cfg)
    manifest = root / "manifest.csv"
    rows = [
        ("s0", 1, 2, "0;1", "test"),
        ("s1", 0, 0, "", "test"),
        ("s2", 1, 1, "1", "test"),
        ("s3", 0, "", "0", "train"),
    ]  # s3: b unknown
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "path", "a", "b", "c", "split"])
        for sid, a, b, c, split in rows:
            w.writerow([sid, f"stores/{sid}.zarr", a, b, c, split])
    return {"root": root, "stores": stores, "cfg": cfg, "ckpt": ckpt, "manifest": manifest}


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predictions_csv_columns_and_metrics(setup, tmp_path):
    out = tmp_path / "p"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(setup["ckpt"]),
                "--manifest",
                str(setup["manifest"]),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = _read(out / "predictions.csv")
    with open(out / "predictions.csv") as f:
        header = f.readline().strip().split(",")
    assert header == ["slide_id", "task", "prob_0", "prob_1", "prob_2", "prediction", "label"]
    assert len(rows) == 4 * 3  # one row per slide and task
    by = {(r["slide_id"], r["task"]): r for r in rows}
    a, b, c = by[("s0", "a")], by[("s0", "b")], by[("s0", "c")]
    assert a["prob_0"] == a["prob_2"] == "" and 0 <= float(a["prob_1"]) <= 1  # binary: P(positive)
    assert a["prediction"] == str(int(float(a["prob_1"]) > 0.5)) and a["label"] == "1"
    probs = [float(b[f"prob_{k}"]) for k in range(3)]
    assert sum(probs) == pytest.approx(1.0, abs=1e-5) and b["prediction"] == str(int(np.argmax(probs)))
    assert b["label"] == "2"
    assert c["prob_2"] == "" and c["label"] == "0;1"  # multilabel: one prob per label, ';'-joined labels
    assert c["prediction"] == ";".join(str(k) for k in range(2) if float(c[f"prob_{k}"]) > 0.5)
    assert by[("s3", "b")]["label"] == "" and by[("s1", "c")]["label"] == ""
    metrics = json.loads((out / "metrics.json").read_text())
    m = metrics["metrics"]
    assert m["a/n_slides"] == 4 and m["b/n_slides"] == 3 and m["c/n_slides"] == 4
    for key in (
        "a/accuracy",
        "a/auroc",
        "a/loss",
        "b/accuracy",
        "b/balanced_accuracy",
        "c/exact_match",
        "loss",
    ):
        assert key in m, key
    assert metrics["mode"] == "topm"


def test_stores_without_labels_and_split(setup, tmp_path):
    out = tmp_path / "p"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(setup["ckpt"]),
                *map(str, setup["stores"][:2]),
                "--out",
                str(out),
                "--mode",
                "all",
            ]
        )
        == 0
    )
    rows = _read(out / "predictions.csv")
    assert [r["slide_id"] for r in rows] == ["s0"] * 3 + ["s1"] * 3
    assert all(r["label"] == "" for r in rows)
    assert not (out / "metrics.json").exists()
    out2 = tmp_path / "q"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(setup["ckpt"]),
                "--manifest",
                str(setup["manifest"]),
                "--split",
                "train",
                "--out",
                str(out2),
            ]
        )
        == 0
    )
    assert {r["slide_id"] for r in _read(out2 / "predictions.csv")} == {"s3"}


def test_validation_and_predict_give_identical_logits(tmp_path):
    """Training's validation and `ips predict` go through one path: for the same checkpoint and slides,
    the logits are equal bit for bit, and so are the metrics computed from them."""
    from ips.data.manifest import read_manifest
    from ips.infer.loop import load, predict_slides
    from ips.training.loop import train

    manifest = make_cross_slides(tmp_path / "data", n_train=4, n_val=4)
    cfg = tiny_config(train={"epochs": 2}, selection={"explore": 0.25})
    seen: dict[str, object] = {}

    def capture(trainer, row):  # at the end of the last epoch: the weights last.pt holds
        seen["logits"], seen["row"] = trainer.validation_logits(), dict(row)

    train(
        cfg,
        manifest=manifest,
        run_dir=tmp_path / "run",
        show_progress=False,
        log=lambda s: None,
        epoch_hooks=[capture],
    )
    val = read_manifest(manifest, cfg.model.tasks, "val")
    report = predict_slides(load(tmp_path / "run" / "checkpoints" / "last.pt", "cpu"), val, tmp_path / "p")
    assert not report.failures and [r.slide_id for r in val] == list(report.logits)
    for i, r in enumerate(val):
        assert torch.equal(report.logits[r.slide_id]["label"], seen["logits"]["label"][i])
    assert report.metrics["loss"] == seen["row"]["val_loss"]
    assert report.metrics["label/auroc"] == seen["row"]["val_label/auroc"]


def test_a_failing_store_does_not_stop_the_others(setup, tmp_path, capsys):
    bad_channels = make_store(tmp_path, "gray", size=(64, 48), channels=1, patch=16)
    missing = tmp_path / "missing.zarr"
    out = tmp_path / "p"
    rc = main(
        [
            "predict",
            "--checkpoint",
            str(setup["ckpt"]),
            str(setup["stores"][0]),
            str(bad_channels),
            str(missing),
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert {r["slide_id"] for r in _read(out / "predictions.csv")} == {"s0"}
    summary = err.split("ips predict: failed:", 1)[1]
    assert "ips predict: 2 of 3 inputs failed" in summary
    assert f"gray ({bad_channels})" in summary and "patches have shape (1, 16, 16)" in summary
    assert f"missing ({missing})" in summary and "does not exist" in summary


def test_bad_usage_exits_2(setup, tmp_path, capsys):
    ck, out = str(setup["ckpt"]), str(tmp_path / "p")
    assert main(["predict", "--checkpoint", ck, "--out", out]) == 2  # no input
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                ck,
                "--manifest",
                str(setup["manifest"]),
                str(setup["stores"][0]),
                "--out",
                out,
            ]
        )
        == 2
    )  # both
    assert (
        main(["predict", "--checkpoint", str(tmp_path / "nope.pt"), str(setup["stores"][0]), "--out", out])
        == 2
    )
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,path\ns0,stores/s0.zarr\ns0,stores/s0.zarr\n")
    assert main(["predict", "--checkpoint", ck, "--manifest", str(bad), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "either --manifest" in err and "does not exist" in err and "duplicate slide_id" in err
