"""benchmarks/codec_accuracy.py end to end on a tiny setting: TIFFs -> one store set per codec -> train -> table."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

import ips.format.image_codecs  # noqa: F401 - registers the lossy codecs with zarr

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_codec_accuracy_tool_runs_each_codec_on_the_same_slides(tmp_path):
    out = tmp_path / "acc"
    argv = ["--out", str(out), "--n-slides", "6", "--size", "160", "--codecs", "blosc-lz4", "jpeg:90"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "codec_accuracy.py"), *argv, "--set", "train.epochs=1"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["codec"]: r for r in json.loads((out / "codec_accuracy.json").read_text())["rows"]}
    assert set(rows) == {"blosc-lz4", "jpeg:90"}
    lossless, jpeg = rows["blosc-lz4"], rows["jpeg:90"]
    assert lossless["psnr_db"] is None and 30 < jpeg["psnr_db"] < 60  # lossless is exact
    assert jpeg["level0_bytes"] < lossless["level0_bytes"] and jpeg["tiff_bytes"] == lossless["tiff_bytes"]
    assert "| jpeg:90 | 0 |" in done.stdout  # the table
    # same slides, labels and splits in both sets; truth aligned with each store's own grid
    sets = ("blosc-lz4", "jpeg_q90")
    manifests = [list(csv.DictReader((out / d / "manifest.csv").read_text().splitlines())) for d in sets]
    strip = [[{k: v for k, v in r.items() if k != "path"} for r in m] for m in manifests]
    assert strip[0] == strip[1] and len(strip[0]) == 6
    with np.load(out / "jpeg_q90" / "truth.npz") as npz:
        truth = dict(npz)
    for r in manifests[1]:
        coords = zarr.open_array(str(out / "jpeg_q90" / r["path"] / "grids" / "default" / "coords"), mode="r")
        assert truth[r["slide_id"]].shape == (coords.shape[0],)
        assert (truth[r["slide_id"]] > 0).any() == (r["n_lesions"] != "0")
    chain = (out / "jpeg_q90" / manifests[1][0]["path"] / "0" / "zarr.json").read_text()
    assert '"imagecodecs_jpeg"' in chain
