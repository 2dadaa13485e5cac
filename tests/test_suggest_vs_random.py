"""benchmarks/suggest_vs_random.py end to end on a tiny marks (b) data set: both arms start from the same
annotated slides, annotate only training slides, each slide once, and the suggest arm annotates exactly
what `ips suggest` ranked; an unreachable target runs every round."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

ROOT = Path(__file__).resolve().parents[1]
DIGITS = Path(os.environ.get("IPS_TEST_DATA", "/nonexistent")) / "mnist_5k.csv.gz"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.skipif(not DIGITS.is_file(), reason="needs IPS_TEST_DATA/mnist_5k.csv.gz")
def test_both_arms_share_the_start_and_annotate_only_unannotated_training_slides(tmp_path):
    out = tmp_path / "svr"
    argv = ["--family", "b", "--digits", str(DIGITS), "--seeds", "3", "--n-slides", "10", "--epochs", "1",
            "--start", "2", "--step", "2", "--max", "4", "--accuracy", "1.01", "--out", str(out),
            "--json", str(out / "result.json")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "suggest_vs_random.py"), *argv]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| 3 | > 4 | > 4 |" in done.stdout  # accuracy 1.01 cannot be reached: every round runs

    data = out / "seed3" / "data"
    manifest = _rows(data / "manifest.csv")
    split = {r["slide_id"]: r["split"] for r in manifest}
    rows = {r["method"]: r for r in json.loads((out / "result.json").read_text())["rows"]}
    assert set(rows) == {"random", "suggest"}
    for r in rows.values():
        assert r["annotated_needed"] is None and [h["annotated"] for h in r["history"]] == [2, 4]
        first, last = (h["slides"] for h in r["history"])
        assert last[:2] == first and len(set(last)) == 4  # grows, each slide once
        assert {split[s] for s in last} == {"train"}  # never a validation or test slide
    start = [h for h in rows["random"]["history"] if h["annotated"] == 2][0]
    assert start == [h for h in rows["suggest"]["history"] if h["annotated"] == 2][0]  # shared, same metrics
    # the suggest arm annotates what `ips suggest` ranked, in its order
    ranked = [r["slide_id"] for r in _rows(out / "seed3" / "start" / "suggest" / "suggestions.csv")]
    assert rows["suggest"]["history"][1]["slides"][2:] == ranked
    # the manifest each round trains with: a truth mask on exactly the annotated slides
    for method, r in rows.items():
        trained = _rows(data / f"manifest_{method}_n4.csv")
        marked = {t["slide_id"] for t in trained if t["annotation"]}
        assert marked == set(r["history"][1]["slides"])
        for t in trained:
            if t["annotation"]:  # one marked cell per patch at least a quarter inside the target
                share = zarr.open_array(str(data / t["path"] / "ips_truth" / "lesion"), mode="r")[:]
                assert int(np.load(data / t["annotation"]).sum()) == int((share >= 0.25).sum())
