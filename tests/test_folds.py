"""k-fold cross-validation: stratified folds, the fold manifests, `ips cv` end to end."""

import csv
import json
from collections import Counter

import numpy as np
import pytest
import yaml
from train_fixtures import TINY, make_cross_slides

from ips.cli.main import main
from ips.config import ConfigError, TaskConfig
from ips.data.manifest import SlideRecord, read_manifest
from ips.training.folds import assign_folds, write_fold_manifest
from ips.training.restarts import best_row, read_rows


@pytest.mark.parametrize(("n_per_class", "k"), [((10, 10), 5), ((7, 3, 5), 3), ((4, 9), 4)])
def test_folds_are_stratified_and_balanced(n_per_class, k):
    labels = [c for c, n in enumerate(n_per_class) for _ in range(n)]
    folds = assign_folds(labels, k, seed=3)
    assert sorted(set(folds)) == list(range(k))
    sizes = Counter(folds)
    assert max(sizes.values()) - min(sizes.values()) <= 1
    for c in range(len(n_per_class)):
        per_fold = Counter(f for f, x in zip(folds, labels) if x == c)
        counts = [per_fold.get(f, 0) for f in range(k)]
        assert max(counts) - min(counts) <= 1, (c, counts)
    assert assign_folds(labels, k, seed=3) == folds  # from the seed alone
    assert assign_folds(labels, k, seed=4) != folds


def test_bad_folds():
    with pytest.raises(ConfigError, match="--folds: at least 2"):
        assign_folds([0, 1, 0, 1], 1, seed=0)
    with pytest.raises(ConfigError, match="--folds 5: only 4"):
        assign_folds([0, 1, 0, 1], 5, seed=0)


def test_fold_manifest_reads_back(tmp_path):
    tasks = [
        TaskConfig(name="tumour", kind="binary"),
        TaskConfig(name="marks", kind="multilabel", num_classes=3),
    ]
    stores = [tmp_path / f"s{i}.zarr" for i in range(3)]
    for s in stores:
        s.mkdir()
    records = [
        SlideRecord("a", str(stores[0]), "train", {"tumour": 1, "marks": (0, 2)}, None),
        SlideRecord("b", str(stores[1]), "val", {"tumour": 0, "marks": ()}, None),
        SlideRecord("c", str(stores[2]), "test", {"tumour": 1, "marks": (1,)}, None),
    ]
    path = write_fold_manifest(records, ["val", "train", "test"], tasks, tmp_path / "f" / "manifest.csv")
    back = read_manifest(path, tasks)
    assert [(r.slide_id, r.path, r.split, r.labels) for r in back] == [
        ("a", str(stores[0]), "val", {"tumour": 1, "marks": (0, 2)}),
        ("b", str(stores[1]), "train", {"tumour": 0, "marks": ()}),
        ("c", str(stores[2]), "test", {"tumour": 1, "marks": (1,)}),
    ]


def test_cli_cv(tmp_path, capsys):
    manifest = make_cross_slides(tmp_path / "data", n_train=6, n_val=3)
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "epochs": 1}}))
    out = tmp_path / "cv"
    argv = ["cv", "--config", str(cfg_path), "--manifest", str(manifest), "--folds", "3", "--out", str(out)]
    assert main([*argv, "--quiet", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    # every train/val slide is in exactly one fold's val split; the folds' val splits are stratified
    val_of = {}
    for f in range(3):
        with (out / f"fold_{f}" / "manifest.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 9 and {r["split"] for r in rows} == {"train", "val"}
        val = [r for r in rows if r["split"] == "val"]
        assert len(val) == 3 and {r["label"] for r in val} == {"0", "1"}
        val_of.update({r["slide_id"]: f for r in val})
    assert sorted(val_of) == [f"s{i:03d}" for i in range(9)]
    summary = json.loads((out / "summary.json").read_text())
    values = [best_row(read_rows(out / f"fold_{f}" / "run"), "val_loss")["val_loss"] for f in range(3)]
    assert summary["folds"] == 3 and summary["metrics"]["val_loss"]["n"] == 3
    assert summary["metrics"]["val_loss"]["mean"] == pytest.approx(np.mean(values))
    assert summary["metrics"]["val_loss"]["sd"] == pytest.approx(np.std(values, ddof=1))
    assert "val_loss" in printed and "summary of 3 folds" in printed
