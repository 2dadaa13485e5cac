"""Prep integrity: workers die with a killed parent, a dead worker fails only the input it held, a store
is complete only through one rename taken last, one prep per store at a time (a lock), stale partial
stores are cleaned, and a rerun with other options says so and names --overwrite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.convert import PrepOptions, prep_file
from data_prep.testing import tissue_image, write_pyramid_tiff
from data_prep.writer import StoreLock, is_complete
from ips.cli.main import main
from ips.data.store import verify_store
from ips.format.store import read_marker

REPO = Path(__file__).resolve().parents[1]
# imported by every Python process started with this folder on PYTHONPATH (the spawned workers too):
# slows each region read so a test can act mid-conversion
SITECUSTOMIZE = """
import os
if os.environ.get("IPS_TEST_SLOW_READ"):
    import time
    import data_prep.readers as readers
    _read = readers.TiffReader._read
    def _slow(self, start, size):
        time.sleep(float(os.environ["IPS_TEST_SLOW_READ"]))
        return _read(self, start, size)
    readers.TiffReader._read = _slow
if os.environ.get("IPS_TEST_CRASH_ON"):  # a worker reading this file dies at once, as in a crash
    import signal
    import data_prep.readers as readers
    _read_c = readers.TiffReader._read
    def _crash(self, start, size):
        if self.path.name == os.environ["IPS_TEST_CRASH_ON"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return _read_c(self, start, size)
    readers.TiffReader._read = _crash
"""


def make_inputs(folder: Path, n: int, size: int = 1024) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_pyramid_tiff(
            folder / f"s{i}.tif",
            tissue_image(size, size, seed=i, box=(0.1, 0.1, 0.9, 0.9)),
            levels=1,
            tile=64,
        )
        for i in range(n)
    ]


def prep_cmd(inputs: list[Path], out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ips.cli",
        "prep",
        *map(str, inputs),
        "--out",
        str(out),
        "--patch-size",
        "64",
        "--threads",
        "1",
        "--no-thumbnail",
        *extra,
    ]


def slow_env(tmp_path: Path, seconds: float) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]),
        "IPS_TEST_SLOW_READ": str(seconds),
    }


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def store_digest(store: Path) -> dict:
    """What must be equal between two runs: every array's written files (sizes, crc32c), the grids."""
    marker = read_marker(store)
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]["ips"]
    return {"arrays": marker.arrays, "grids": marker.grids, "grid_attrs": attrs["grids"]}


@pytest.mark.slow
@pytest.mark.timing
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill9_parent_of_workers(tmp_path):
    inputs = make_inputs(tmp_path / "in", 4)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        prep_cmd(inputs, out, "--workers", "2"),
        env=slow_env(tmp_path, 0.4),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until a worker has written a level-0 shard
            if any(p.is_file() for p in out.glob(".s*.zarr.partial-*/0/c/*/*/*")):
                break
            assert proc.poll() is None, "the run finished before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no shard written within 60 s")
        workers = children(proc.pid)
        assert len(workers) >= 2, workers
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if alive(w)], "workers outlived their parent"
    finally:
        proc.kill()
        for w in workers:
            if alive(w):
                os.kill(w, signal.SIGKILL)
    for store in out.glob("*.zarr"):  # whatever looks complete is complete and intact
        assert is_complete(store) and verify_store(store) == [], store
    # a rerun at once finishes the job; its stores equal a clean run's
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert (
        subprocess.run(prep_cmd(inputs, out, "--workers", "2"), env=env, capture_output=True).returncode == 0
    )
    clean = tmp_path / "clean"
    assert (
        subprocess.run(prep_cmd(inputs, clean, "--workers", "2"), env=env, capture_output=True).returncode
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())
    for src in inputs:
        name = f"{src.stem}.zarr"
        assert verify_store(out / name) == []
        assert store_digest(out / name) == store_digest(clean / name), name


def test_rerun_with_other_options_names_overwrite(tmp_path, capsys):
    src = make_inputs(tmp_path / "in", 1, size=256)[0]
    out = tmp_path / "out"
    args = ["prep", str(src), "--out", str(out), "--no-thumbnail", "--min-tissue", "0.1"]
    assert main([*args, "--patch-size", "64"]) == 0
    before = read_marker(out / "s0.zarr")
    assert main([*args, "--patch-size", "64"]) == 0  # same options: skipped
    assert "1 skipped" in capsys.readouterr().out
    assert main([*args, "--patch-size", "32"]) == 1
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "FAILED" in ln)
    assert "patch_size 64 (this run: 32)" in line and "--overwrite" in line
    assert read_marker(out / "s0.zarr") == before  # left as it was
    assert main([*args, "--patch-size", "32", "--overwrite"]) == 0
    assert json.loads((out / "s0.zarr" / "zarr.json").read_text())["attributes"]["ips"]["grids"]["default"][
        "patch_size"
    ] == [32, 32]
    assert main([*args, "--patch-size", "32", "--codec", "blosc-lz4"]) == 1
    assert "codec zstd (this run: blosc-lz4)" in capsys.readouterr().err


def test_a_held_lock_refuses_a_second_prep_and_keeps_its_partial(tmp_path):
    src = make_inputs(tmp_path / "in", 1, size=256)[0]
    out = tmp_path / "out"
    out.mkdir()
    theirs = out / ".s0.zarr.partial-12345"
    theirs.mkdir()
    opts = PrepOptions(patch_size=64, thumbnail=False, min_tissue=0.1)
    with StoreLock(out, "s0"):
        result = prep_file(src, out, options=opts)
        assert (
            result.status == "failed"
            and "another ips prep (pid" in result.reason
            and "s0.zarr" in result.reason
        )
        assert theirs.is_dir()  # not ours to remove while its lock is held
    result = prep_file(src, out, options=opts)  # the lock is free: the stale partial goes
    assert result.status == "done" and not theirs.exists()
    assert sorted(p.name for p in out.iterdir()) == ["s0.zarr"]
    assert verify_store(out / "s0.zarr") == []


def test_complete_only_through_the_rename(tmp_path, monkeypatch):
    """A failure after the marker is written inside the partial store leaves nothing complete-looking."""
    from data_prep import writer as w

    src = make_inputs(tmp_path / "in", 1, size=256)[0]
    out = tmp_path / "out"
    real_rename = os.rename

    def fail_final(a, b):
        if str(b).endswith("s0.zarr"):
            raise OSError(5, "Input/output error")
        real_rename(a, b)

    monkeypatch.setattr(w.os, "rename", fail_final)
    result = prep_file(src, out, options=PrepOptions(patch_size=64, thumbnail=False, min_tissue=0.1))
    assert result.status == "failed"
    assert not (out / "s0.zarr").exists() and not list(out.glob(".*"))


@pytest.mark.slow
def test_two_concurrent_preps_do_not_interleave(tmp_path):
    inputs = make_inputs(tmp_path / "in", 1)
    out = tmp_path / "out"
    env = slow_env(tmp_path, 0.3)
    procs = [
        subprocess.Popen(
            prep_cmd(inputs, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [(*reversed(p.communicate(timeout=120)), p.returncode) for p in procs]  # (err, out, code)
    results = [(code, o, e) for e, o, code in results]
    codes = sorted(r[0] for r in results)
    assert codes[0] == 0, results
    for code, _, err in results:
        if code:
            assert "another ips prep (pid" in err and "s0.zarr" in err, err
    assert verify_store(out / "s0.zarr") == []
    assert sorted(p.name for p in out.iterdir()) == ["s0.zarr"]


def spawned_workers(pid: int) -> list[int]:
    """The pool's worker processes among `pid`'s children (not multiprocessing's resource tracker)."""
    found = []
    for child in children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found.append(child)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_that_dies_fails_only_the_input_it_held(tmp_path):
    inputs = make_inputs(tmp_path / "in", 4, size=256)
    out = tmp_path / "out"
    env = {**slow_env(tmp_path, 0.0), "IPS_TEST_CRASH_ON": "s1.tif"}
    run = subprocess.run(prep_cmd(inputs, out, "--workers", "2"), env=env, capture_output=True, text=True)
    assert run.returncode == 1, run.stderr
    failed = [line for line in run.stderr.splitlines() if line.startswith("ips prep: FAILED")]
    assert len(failed) == 1 and "s1.tif" in failed[0] and "worker process died" in failed[0], run.stderr
    assert sorted(p.name for p in out.glob("*.zarr")) == ["s0.zarr", "s2.zarr", "s3.zarr"]
    for name in ("s0", "s2", "s3"):
        assert is_complete(out / f"{name}.zarr") and verify_store(out / f"{name}.zarr") == []


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_killed_once_costs_no_input(tmp_path):
    inputs = make_inputs(tmp_path / "in", 4)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        prep_cmd(inputs, out, "--workers", "2"),
        env=slow_env(tmp_path, 0.2),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until a worker has written a level-0 shard
            if any(p.is_file() for p in out.glob(".s*.zarr.partial-*/0/c/*/*/*")):
                break
            assert proc.poll() is None, "the run finished before a worker could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no shard written within 60 s")
        workers = spawned_workers(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "retrying it alone" in stderr and "FAILED" not in stderr, stderr
    for src in inputs:
        store = out / f"{src.stem}.zarr"
        assert is_complete(store) and verify_store(store) == [], store
