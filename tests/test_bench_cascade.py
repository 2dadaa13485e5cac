"""`ips bench cascade`: the JSON contract on a tiny setting (not that it is fast), and bad arguments."""

import json
import math
import time

import pytest

from ips.cli.main import main

TINY = ["--patch-size", "16", "--M", "4", "--I", "32", "--threads", "1", "--encoder", "ips_cnn_tiny"]


@pytest.mark.slow
def test_cascade_json_contract(tmp_path):
    out = tmp_path / "c.json"
    (tmp_path / "c.json").write_text(json.dumps({"throughput": {"kept": True}}))
    t0 = time.perf_counter()
    argv = ["bench", "cascade", "--n", "400", *TINY, "--distill-steps", "3", "--candidates", "0.25"]
    assert main([*argv, "--json", str(out)]) == 0
    wall = time.perf_counter() - t0
    data = json.loads(out.read_text())
    assert data["throughput"] == {"kept": True}  # other kinds' results in the file survive
    c = data["cascade"]
    assert c["n_patches"] == 400
    for key in ("full_seconds", "cascade_seconds", "ratio"):
        assert isinstance(c[key], float) and c[key] > 0 and math.isfinite(c[key]), key
    assert math.isclose(c["ratio"], c["cascade_seconds"] / c["full_seconds"], rel_tol=1e-3, abs_tol=1e-4)
    assert 0.0 <= c["recall_top_m"] <= 1.0
    assert c["candidates"] == 100  # a quarter of N
    # the contract's five keys also at the top of the file, equal to the payload's
    for key in ("n_patches", "full_seconds", "cascade_seconds", "ratio", "recall_top_m"):
        assert data[key] == c[key], key
    # both passes ran inside the command: together they fit in its wall time
    assert c["full_seconds"] + c["cascade_seconds"] < wall


def test_cascade_bench_rejects_bad_arguments():
    # a patch side that the coarse factor does not divide
    assert main(["bench", "cascade", "--n", "50", "--patch-size", "18", "--threads", "1"]) == 2
