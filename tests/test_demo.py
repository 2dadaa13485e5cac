"""`ips demo`: its config is configs/demo.yaml, and the quick setting runs end to end and finds the lesions;
`ips.eval.lesion_auroc` and `ips eval heatmaps`, which score heatmaps against planted truth."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from ips.cli.main import main
from ips.config import ConfigError, load_config
from ips.demo import DEMO_CONFIG, demo_config, run_demo
from ips.eval import lesion_auroc

REPO = Path(__file__).resolve().parents[1]

# A heatmap that ignored the lesions scores 0.5; the quick demo's measured value is well above this bar
# (docs/BENCHMARKS.md, "Demo"), which leaves margin for other platforms' numerics.
LESION_AUROC_MIN = 0.75


def mann_whitney(scores: np.ndarray, positive: np.ndarray) -> float:
    """AUROC by its definition, independent of ips: the share of (positive, negative) pairs ordered right,
    ties counting one half."""
    pos, neg = scores[positive][:, None], scores[~positive][None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def test_the_oracle():
    assert mann_whitney(np.array([0.1, 0.5, 0.2, 0.9]), np.array([False, True, False, True])) == 1.0
    assert mann_whitney(np.array([0.3, 0.3]), np.array([True, False])) == 0.5
    assert mann_whitney(np.array([0.9, 0.1, 0.5]), np.array([False, True, True])) == 0.0


def test_demo_config_is_configs_demo_yaml():
    """configs/ is not installed with the package: the demo carries its config, kept equal to the file."""
    assert load_config(REPO / "configs" / "demo.yaml") == demo_config(), (
        "configs/demo.yaml and ips.demo.DEMO_CONFIG differ; keep them equal"
    )
    assert demo_config(["train.epochs=2"]).train.epochs == 2
    assert "train" not in DEMO_CONFIG and demo_config().train.epochs != 2  # overrides do not leak


@pytest.mark.slow
@pytest.mark.learning
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--quiet"]) == 0
    record = json.loads((out / "demo.json").read_text())
    assert record["check"] == {"lesion_auroc_threshold": 0.75, "passed": True}
    assert record["test_metrics"]["label/n_slides"] >= 2
    for key in ("manifest", "config", "checkpoint", "curves", "predictions"):
        assert Path(record["files"][key]).is_file(), key
    assert load_config(record["files"]["config"]) == demo_config(["train.epochs=20", "train.device=auto"])
    heatmaps = sorted(Path(record["files"]["heatmaps"]).iterdir())
    assert heatmaps and all((h / "heatmap.png").is_file() and (h / "scores.zarr").is_dir() for h in heatmaps)
    # the reported AUROC is of what the files show, recomputed here from the manifest, the heatmaps'
    # attention and the stores' truth by the definition: every positive test slide, and their mean
    with open(record["files"]["manifest"], newline="") as f:
        positives = [r for r in csv.DictReader(f) if r["split"] == "test" and r["label"] == "1"]
    oracle = {}
    for row in positives:
        attention = zarr.open_group(str(out / "heatmaps" / row["slide_id"] / "scores.zarr"), mode="r")[
            "attention"
        ]
        truth = zarr.open_group(str(out / "data" / row["path"]), mode="r")["ips_truth/lesion"][...]
        oracle[row["slide_id"]] = mann_whitney(np.asarray(attention[...])[:, 0], np.asarray(truth) > 0)
    assert record["lesion_auroc_per_slide"] == pytest.approx(oracle)
    assert record["lesion_auroc"] == pytest.approx(np.mean(list(oracle.values())))
    assert np.mean(list(oracle.values())) >= LESION_AUROC_MIN, oracle


def test_lesion_auroc_reads_attention_and_truth(tmp_path):
    scores = zarr.open_group(str(tmp_path / "scores.zarr"), mode="w")
    scores.create_array("attention", data=np.array([[0.1], [0.5], [0.2], [0.9]], np.float32))
    store = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    store.create_array("ips_truth/lesion", data=np.array([0.0, 0.3, 0.0, 1.0], np.float32))
    assert lesion_auroc(tmp_path / "scores.zarr", tmp_path / "s.zarr") == 1.0


def test_lesion_auroc_reads_another_truth_and_task(tmp_path):
    """`truth="digit"` reads `ips_truth/digit` (Megapixel MNIST); `task` picks the attention column."""
    scores = zarr.open_group(str(tmp_path / "scores.zarr"), mode="w")
    scores.create_array("attention", data=np.array([[0.9, 0.1], [0.1, 0.9], [0.2, 0.0]], np.float32))
    store = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    store.create_array("ips_truth/digit", data=np.array([0.0, 0.4, 0.0], np.float32))
    assert lesion_auroc(tmp_path / "scores.zarr", tmp_path / "s.zarr", truth="digit") == 0.0
    assert lesion_auroc(tmp_path / "scores.zarr", tmp_path / "s.zarr", task=1, truth="digit") == 1.0
    with pytest.raises(KeyError):
        lesion_auroc(tmp_path / "scores.zarr", tmp_path / "s.zarr")


def test_lesion_auroc_reads_the_truth_of_the_heatmaps_grid(tmp_path):
    """A heatmap of grid `halo` is scored against `ips_truth/halo/<truth>`, not the default grid's."""
    scores = zarr.open_group(str(tmp_path / "scores.zarr"), mode="w")
    scores.create_array("attention", data=np.array([[0.9], [0.1], [0.2]], np.float32))
    store = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    store.create_array("ips_truth/digit", data=np.array([0.0, 0.4, 0.0], np.float32))
    store.create_array("ips_truth/halo/digit", data=np.array([0.7, 0.0, 0.0], np.float32))
    assert lesion_auroc(tmp_path / "scores.zarr", tmp_path / "s.zarr", truth="digit") == 0.0
    scores.attrs["grid"] = "halo"
    assert lesion_auroc(tmp_path / "scores.zarr", tmp_path / "s.zarr", truth="digit") == 1.0


def test_lesion_auroc_core_leaves_out_the_slivers(tmp_path):
    """A sliver patch (share 0.05) ranked below background counts against "any share" but is left out of
    the core AUROC (positives share >= 0.25, negatives share 0)."""
    scores = zarr.open_group(str(tmp_path / "scores.zarr"), mode="w")
    scores.create_array("attention", data=np.array([[0.1], [0.5], [0.0], [0.2], [0.9]], np.float32))
    store = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    store.create_array("ips_truth/lesion", data=np.array([0.0, 0.3, 0.05, 0.0, 1.0], np.float32))
    # any share: positives {0.5, 0.0, 0.9} vs negatives {0.1, 0.2}: 4 of 6 pairs ordered
    assert lesion_auroc(tmp_path / "scores.zarr", tmp_path / "s.zarr") == pytest.approx(4 / 6)
    assert lesion_auroc(tmp_path / "scores.zarr", tmp_path / "s.zarr", min_share=0.25) == 1.0


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        run_demo(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 2


def _fake_heatmaps(root: Path) -> Path:
    """A manifest of 3 test slides and 1 train slide, each store with `ips_truth/lesion`, and heatmaps of
    two tasks for the test slides: task 0 finds the lesion, task 1 ranks it last; slide c has no lesion."""
    truth = {
        "a": [0.0, 0.3, 0.0, 1.0],
        "b": [0.05, 0.0, 0.6, 0.0],
        "c": [0.0, 0.0, 0.0, 0.0],
        "d": [1.0, 0, 0, 0],
    }
    attention = {
        "a": [[0.1, 0.9], [0.5, 0.2], [0.2, 0.8], [0.9, 0.1]],
        "b": [[0.0, 0.3], [0.1, 0.9], [0.8, 0.1], [0.2, 0.7]],
        "c": [[0.1, 0.1], [0.2, 0.2], [0.3, 0.3], [0.4, 0.4]],
    }
    rows = []
    for slide, share in truth.items():
        store = zarr.open_group(str(root / "stores" / f"{slide}.zarr"), mode="w")
        store.create_array("ips_truth/lesion", data=np.array(share, np.float32))
        split = "train" if slide == "d" else "test"
        rows.append(f"{slide},stores/{slide}.zarr,{int(max(share) > 0)},{split}")
        if slide in attention:
            scores = zarr.open_group(str(root / "heat" / slide / "scores.zarr"), mode="w")
            scores.create_array("attention", data=np.array(attention[slide], np.float32))
            scores.attrs["tasks"] = ["found", "missed"]
    (root / "manifest.csv").write_text("slide_id,path,label,split\n" + "\n".join(rows) + "\n")
    return root / "manifest.csv"


def test_eval_heatmaps_scores_each_task_against_the_truth(tmp_path, capsys):
    manifest = _fake_heatmaps(tmp_path)
    assert main(["eval", "heatmaps", str(tmp_path / "heat"), "--manifest", str(manifest), "--quiet"]) == 0
    summary = json.loads((tmp_path / "heat" / "summary.json").read_text())
    # by hand, task 0: slide a, positives {0.5, 0.9} above negatives {0.1, 0.2}: 1.0; slide b, the sliver
    # (0.0) below both negatives and the core patch (0.8) above both: any 2/4, core 1.0; slide c has no
    # positive patch and is left out. Task 1: slide a 0.0; slide b, positives {0.3, 0.1} below negatives
    # {0.9, 0.7}: 0.0, core 0.0
    assert summary == {
        "found": {"heatmap_auroc": pytest.approx((1.0 + 0.5) / 2), "heatmap_auroc_core": 1.0, "n_slides": 2},
        "missed": {"heatmap_auroc": 0.0, "heatmap_auroc_core": 0.0, "n_slides": 2},
    }
    assert capsys.readouterr().out == ""


def test_eval_heatmaps_refuses_what_it_cannot_score(tmp_path, capsys):
    manifest = _fake_heatmaps(tmp_path)
    heat = str(tmp_path / "heat")
    assert main(["eval", "heatmaps", heat, "--manifest", str(manifest), "--split", "val"]) == 2
    assert "no row of split 'val'" in capsys.readouterr().err
    assert main(["eval", "heatmaps", str(tmp_path / "none"), "--manifest", str(manifest)]) == 2
    assert "no heatmap scores at" in capsys.readouterr().err
