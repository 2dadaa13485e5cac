"""Host memory is bounded: a streaming pass's peak RSS does not grow with the number of patches.

Each pass runs in a fresh subprocess (peak RSS is per process and never goes down), over stores whose
background chunks are unwritten (cheap to make) with one band of real chunks to decode. Tolerance: the
100k-patch pass may exceed the 10k-patch pass by at most 16 MiB and 10 % (O(N) scalars - coords,
positions, the order - are ~3 MiB at 100k; holding the patches would be +69 MiB at 16 x 16 x 3).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from loader_fixtures import write_big_store

TESTS = Path(__file__).parent
REPO = TESTS.parent
TOLERANCE_BYTES = 16 * 2**20
TOLERANCE_RATIO = 1.10


def _peak(store: Path, mode: str = "stream", chunk_size: int = 256) -> dict:
    code = (
        f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(REPO)!r}]; from loader_fixtures import rss_child; "
        f"rss_child({str(store)!r}, {chunk_size}, {mode!r})"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("rss")
    return {n: write_big_store(root / f"s{n}.zarr", n) for n in (10_000, 100_000)}


@pytest.mark.slow
@pytest.mark.rss
def test_streaming_peak_rss_does_not_grow_with_n(stores):
    small, big = _peak(stores[10_000]), _peak(stores[100_000])
    assert small["n"] == 10_000 and big["n"] == 100_000
    growth = big["peak_rss"] - small["peak_rss"]
    print(
        f"peak RSS: 10k {small['peak_rss'] / 2**20:.1f} MiB, 100k {big['peak_rss'] / 2**20:.1f} MiB, "
        f"growth {growth / 2**20:+.1f} MiB"
    )
    assert growth <= TOLERANCE_BYTES, f"peak RSS grew by {growth / 2**20:.1f} MiB from 10k to 100k patches"
    assert big["peak_rss"] <= TOLERANCE_RATIO * small["peak_rss"]


@pytest.mark.slow
@pytest.mark.rss
def test_control_holding_all_patches_is_detected(stores):
    """The measurement can see growth: reading all 100k patches at once exceeds the tolerance."""
    small, naive = _peak(stores[10_000]), _peak(stores[100_000], mode="naive")
    assert naive["peak_rss"] - small["peak_rss"] > TOLERANCE_BYTES
