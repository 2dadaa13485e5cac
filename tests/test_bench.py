"""`ips bench`: each kind writes valid JSON with the fields the README promises, on a tiny setting (not that it is fast)."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ips.bench import memory as bench_memory
from ips.bench.common import parse_int_list, write_json
from ips.bench.encoders import count_macs
from ips.bench.stores import BACKGROUND, bench_store
from ips.bench.throughput import _payload
from ips.cli.main import main
from ips.data.zarr_source import ZarrPatchSource

TINY = ["--patch-size", "16", "--M", "4", "--I", "32", "--threads", "1"]


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _torch_process_peak_rss() -> int:
    """Peak RSS (bytes) of a fresh Python that only imports torch: measured here, not by ips. A process
    that runs a training step imports torch too, so it cannot peak lower."""
    code = (
        "import torch\nprint(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return int(done.stdout.split()[-1]) * 1024


@pytest.mark.slow
@pytest.mark.rss
def test_memory_json_contract_and_plot(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "memory.png"
    write_json(out, "throughput", {"kept": True})  # another kind's results in the same file survive
    rc = main(
        [
            "bench",
            "memory",
            "--n",
            "64,300",
            *TINY,
            "--B",
            "2",
            "--json",
            str(out),
            "--plot",
            str(png),
            "--naive-budget-gb",
            "8",
            "--store-dir",
            str(tmp_path / "stores"),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["throughput"] == {"kept": True}
    mem = data["memory"]
    assert isinstance(mem["device"], str) and mem["device"]
    assert [r["n_patches"] for r in mem["rows"]] == [64, 300]
    for r in mem["rows"] + mem["naive"]["rows"]:
        assert r["status"] == "ok", r
        assert _is_count(r["peak_host_rss_bytes"])
        assert (
            r["peak_device_bytes"] is None
            if not torch.cuda.is_available()
            else _is_count(r["peak_device_bytes"])
        )
        assert isinstance(r["seconds"], float) and r["seconds"] > 0
        assert r["peak_host_rss_bytes"] >= r["rss_before_step_bytes"]
    # the figures are a real process's bytes: no lower than a bare torch process measured here
    floor = _torch_process_peak_rss()
    assert all(r["peak_host_rss_bytes"] >= floor for r in mem["rows"] + mem["naive"]["rows"]), floor
    # monotone-sane: IPS stays flat (generous bound), the naive baseline does not shrink with N
    ips_rss = [r["peak_host_rss_bytes"] for r in mem["rows"]]
    assert max(ips_rss) <= 1.5 * min(ips_rss)
    naive = [r["peak_host_rss_bytes"] for r in mem["naive"]["rows"]]
    assert naive[1] >= 0.95 * naive[0]
    assert mem["naive"]["budget_bytes"] == 8 * 2**30
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_naive_stops_at_the_first_n_over_budget(tmp_path, monkeypatch):
    """Larger N are not run once one is over budget (or fails): the contrast without the crash."""
    runs = []

    def fake(argv, timeout):
        mode, n = (
            argv[argv.index("--mode") + 1],
            int(Path(argv[argv.index("--store") + 1]).name.split("_")[1][1:]),
        )
        runs.append((mode, n))
        rss = (100 if n < 80 else 150) if mode == "ips" else 10 * n
        return {
            "n_patches": n,
            "peak_device_bytes": None,
            "peak_host_rss_bytes": rss,
            "seconds": 0.1,
            "status": "ok",
        }

    monkeypatch.setattr(bench_memory, "_run_in_subprocess", fake)
    result = bench_memory.run_memory(
        [10, 20, 40, 80],
        patch_size=8,
        naive_budget_bytes=250,
        device="cpu",
        store_dir=tmp_path,
        log=lambda s: None,
    )
    assert [r["status"] for r in result["naive"]["rows"]] == [
        "ok",
        "ok",
        "over budget",
        "not run (N=40 was over budget)",
    ]
    assert ("naive", 80) not in runs and ("ips", 80) in runs
    assert result["host_rss_ratio"] == 1.5  # IPS peak at the largest N (150) / at the smallest (100)


def test_throughput_ratios_are_of_the_fastest_passes():
    """Known times in, hand-computed figures out: ratio = fastest selection / fastest encoder-only pass,
    ratio_median of the medians, loader_ratio = fastest loader / fastest raw read."""
    times = {
        "selection": [3.0, 2.0, 4.0],
        "encoder_only": [1.0, 2.0, 4.0],
        "selection_in_memory": [1.5, 1.25, 9.0],
        "loader": [0.5, 0.25, 0.75],
        "raw_zarr": [1.0, 2.0, 0.5],
    }
    cpu = {k: [2 * t for t in v] for k, v in times.items()}
    p = _payload(times, cpu, torch.device("cpu"), 100, 16, {})
    assert (p["selection_seconds"], p["encoder_only_seconds"], p["ratio"]) == (2.0, 1.0, 2.0)
    assert p["ratio_median"] == 1.5 and p["in_memory_ratio"] == 1.25 and p["loader_ratio"] == 0.5
    assert p["cpu_ratio"] == 2.0 and p["loader_cpu_fraction"] == 0.25
    assert p["patches_per_second"]["selection"] == 50.0


def test_throughput_json_contract(tmp_path):
    out = tmp_path / "t.json"
    t0 = time.perf_counter()
    rc = main(
        [
            "bench",
            "throughput",
            "--n",
            "96",
            "--encoder",
            "ips_cnn_tiny",
            *TINY,
            "--repeats",
            "1",
            "--json",
            str(out),
        ]
    )
    wall = time.perf_counter() - t0  # an outside clock around the whole command
    assert rc == 0
    t = json.loads(out.read_text())["throughput"]
    assert isinstance(t["device"], str) and t["n_patches"] == 96
    for key in (
        "selection_seconds",
        "encoder_only_seconds",
        "ratio",
        "loader_seconds",
        "raw_zarr_seconds",
        "loader_ratio",
    ):
        assert isinstance(t[key], float) and t[key] > 0 and math.isfinite(t[key]), key
    # each kind ran a warm-up and one timed pass inside the command: together they fit in its wall time
    passes = ("selection", "encoder_only", "selection_in_memory", "loader", "raw_zarr")
    assert all(len(t["all_seconds"][k]) == 1 for k in passes)
    assert sum(t["all_seconds"][k][0] for k in passes) < wall


def test_throughput_codec_option_measures_a_store_per_codec(tmp_path):
    out, stores = tmp_path / "t.json", tmp_path / "stores"
    argv = ["bench", "throughput", "--n", "32", "--encoder", "ips_cnn_tiny", *TINY, "--repeats", "1"]
    rc = main([*argv, "--codec", "blosc-lz4", "jpeg", "--store-dir", str(stores), "--json", str(out)])
    assert rc == 0
    t = json.loads(out.read_text())["throughput"]
    assert t["codec"] == "blosc-lz4" and [c["codec"] for c in t["codecs"]] == ["blosc-lz4", "jpeg"]
    assert t["ratio"] == t["codecs"][0]["ratio"]  # the contract keys are the first codec's
    for row in t["codecs"]:
        assert row["ratio"] > 0 and row["loader_ratio"] > 0 and row["level0_bytes"] > 0
    # each store's level 0 is coded as asked: its codec chain (inside the shards) names the codec
    chains = {p.name: (p / "0" / "zarr.json").read_text() for p in stores.glob("*.zarr")}
    assert len(chains) == 2
    jpeg = next(v for k, v in chains.items() if k.endswith("_jpeg.zarr"))
    lossless = next(v for k, v in chains.items() if not k.endswith("_jpeg.zarr"))
    assert '"imagecodecs_jpeg"' in jpeg and '"blosc"' not in jpeg
    assert '"blosc"' in lossless and "imagecodecs" not in lossless
    with pytest.raises(SystemExit):  # not one of prep's codecs
        main([*argv, "--codec", "png"])


def test_encoders_json_contract(tmp_path):
    out = tmp_path / "e.json"
    rc = main(
        [
            "bench",
            "encoders",
            "--encoders-2d",
            "ips_cnn_tiny,ips_resnet10",
            "--encoders-3d",
            "ips_fire10",
            "--patch-2d",
            "32",
            "--patch-3d",
            "32",
            "--batch-2d",
            "2",
            "--batch-3d",
            "1",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    e = json.loads(out.read_text())["encoders"]
    assert [(r["encoder"], r["spatial_dims"]) for r in e["rows"]] == [
        ("ips_cnn_tiny", 2),
        ("ips_resnet10", 2),
        ("ips_fire10", 3),
    ]
    for r in e["rows"]:
        for key in ("params", "macs_per_patch", "activation_bytes_per_patch"):
            assert _is_count(r[key]), key
        assert r["infer_ms_per_patch"] > 0 and r["train_ms_per_patch"] > 0
        assert 0 < r["stem_macs_share"] <= 1
    tiny, r10 = e["rows"][0], e["rows"][1]
    assert r10["params_vs_resnet10"] == 1.0 and tiny["params_vs_resnet10"] < 0.1
    assert "params_vs_resnet10" not in e["rows"][2]  # no 3D resnet10 measured: no ratio


def test_macs_are_half_the_flops_of_a_convolution():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_macs(conv, torch.zeros(4, 3, 10, 10)) == 8 * 10 * 10 * 3 * 3 * 3  # batch of one counted
    dw = nn.Conv3d(8, 8, 3, padding=1, groups=8, bias=False)
    assert count_macs(dw, torch.zeros(1, 8, 4, 4, 4)) == 8 * 4**3 * 27


def test_bench_store_has_exactly_n_patches_and_a_fixed_tissue_band(tmp_path):
    store = bench_store(tmp_path, 1000, patch_size=8, tissue_patches=100)
    assert bench_store(tmp_path, 1000, patch_size=8, tissue_patches=100) == store  # reused
    src = ZarrPatchSource(store)
    assert len(src) == 1000 and src.patch_shape == (3, 8, 8)
    first, last = src.read(np.array([0, 999]))
    assert (first != BACKGROUND).any() and (last == BACKGROUND).all()
    assert sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) < 2**20


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "memory", "--n", "10,abc"])
    assert parse_int_list("1k, 250k,2") == [1000, 250000, 2]
    with pytest.raises(ValueError):
        parse_int_list("0")
    if not torch.cuda.is_available():
        assert main(["bench", "throughput", "--device", "cuda", "--n", "8"]) == 2
