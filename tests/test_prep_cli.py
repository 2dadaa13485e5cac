"""`ips prep` on the command line: every kind of bad input beside good ones in one call (exit 1, one
line each, the good ones complete), usage errors (exit 2), --shard, --workers, the console script."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from zarr.storage import LocalStore

from data_prep.cli import parse_shard, summary_table
from data_prep.convert import PrepResult
from data_prep.testing import tissue_image, write_pyramid_tiff
from data_prep.writer import ShardEncoder, is_complete
from ips.cli.main import main

GOOD = ("good_a", "good_b")


def make_inputs(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """Two good slides and one of each bad kind: `(paths, {slide_id or name: expected reason})`."""
    folder.mkdir()
    paths = [
        write_pyramid_tiff(folder / f"{g}.tif", tissue_image(160, 200, seed=i), levels=1, tile=32)
        for i, g in enumerate(GOOD)
    ]
    bad: dict[str, str] = {}

    def add(name: str, reason: str, data: bytes | None = None) -> None:
        path = folder / name
        if data is not None:
            path.write_bytes(data)
        paths.append(path)
        bad[name] = reason

    add("missing.svs", "file not found")
    (folder / "a_folder").mkdir()
    add("a_folder", "is a directory")
    add("empty.tif", "empty file", b"")
    add("notes.svs", "unsupported format", b"these are not pixels\n")
    add("corrupt.tif", "corrupt or truncated TIFF", b"II*\x00" + bytes(range(256)) * 4)
    whole = write_pyramid_tiff(
        folder / "tmp.tif",
        np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8),
        levels=1,
        tile=32,
    ).read_bytes()
    (folder / "tmp.tif").unlink()
    add("truncated.tif", "truncated TIFF", whole[: len(whole) // 2])
    write_pyramid_tiff(folder / "blank.tif", np.full((128, 128, 3), 255, np.uint8), levels=1, tile=32)
    add("blank.tif", "no tissue")
    tifffile.imwrite(folder / "nompp.tif", tissue_image(128, 128), photometric="rgb")  # no resolution tags
    add("nompp.tif", "no microns-per-pixel")
    write_pyramid_tiff(folder / "diskfull.tif", tissue_image(160, 200), levels=1, tile=32)
    add("diskfull.tif", "disk full")
    return paths, bad


def fill_disk_for(monkeypatch, marker: str) -> None:
    """Writes into stores whose path contains `marker` fail with ENOSPC, as on a full disk: pixel shards
    (written by the writer's shard encoder) and zarr's own writes (metadata, small arrays) after the
    first shard."""
    full = OSError(errno.ENOSPC, "No space left on device")
    put, zarr_set = ShardEncoder._put, LocalStore.set

    def put_or_full(path, data):
        if marker in str(path):
            raise full
        put(path, data)

    async def set_or_full(self, key, value):
        if marker in str(self.root) and "/c/" in key:
            raise full
        return await zarr_set(self, key, value)

    monkeypatch.setattr(ShardEncoder, "_put", staticmethod(put_or_full))
    monkeypatch.setattr(LocalStore, "set", set_or_full)


def check_outcome(out: Path, bad: dict[str, str], stderr: str, stdout: str) -> None:
    for g in GOOD:
        assert is_complete(out / f"{g}.zarr"), g
        assert (out / f"{g}.thumbnail.png").is_file()
    lines = [ln for ln in stderr.splitlines() if ln.startswith("ips prep: FAILED")]
    assert len(lines) == len(bad), stderr
    for name, reason in bad.items():
        line = next((ln for ln in lines if f"/{name}:" in ln), None)
        assert line is not None and reason in line, (name, reason, lines)
        assert not (out / f"{name.split('.')[0]}.zarr").exists()
        assert f"{name.split('.')[0]}" in stdout  # the summary names it too
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "partial stores must be cleaned up"
    assert "2 done, 9 failed" in stdout


def test_bad_inputs_beside_good_ones(tmp_path, monkeypatch, capsys):
    paths, bad = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    fill_disk_for(monkeypatch, "diskfull")
    status = main(["prep", *map(str, paths), "--out", str(out), "--mpp", "0.5", "--patch-size", "32"])
    captured = capsys.readouterr()
    assert status == 1
    check_outcome(out, bad, captured.err, captured.out)
    # a rerun skips the complete stores and fails the same inputs again
    monkeypatch.undo()
    status = main(["prep", *map(str, paths), "--out", str(out), "--mpp", "0.5", "--patch-size", "32"])
    rerun = capsys.readouterr().out
    assert status == 1 and "2 skipped" in rerun and "diskfull" in rerun and "done" in rerun


def test_console_script(tmp_path):
    script = Path(sys.executable).parent / "ips"
    if not script.exists():
        pytest.skip(f"console script {script} is not installed")
    paths, bad = make_inputs(tmp_path / "in")
    del bad["diskfull.tif"]  # a full disk can only be simulated in-process
    paths = [p for p in paths if p.name != "diskfull.tif"]
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(script), "prep", *map(str, paths), "--out", str(out), "--mpp", "0.5", "--patch-size", "32"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    check_outcome(out, bad, proc.stderr, proc.stdout.replace("2 done, 8 failed", "2 done, 9 failed"))


@pytest.mark.parametrize(
    "argv",
    [
        ["prep"],  # no inputs, no --out
        ["prep", "x.svs"],  # no --out
        ["prep", "x.svs", "--out", "o", "--shard", "2/2"],
        ["prep", "x.svs", "--out", "o", "--shard", "a"],
        ["prep", "x.svs", "--out", "o", "--level", "1", "--mpp", "0.5"],
        ["prep", "x.svs", "--out", "o", "--reader", "nope"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--patch-size", "0"], "prep.patch_size"),
        (["--min-tissue", "2"], "prep.min_tissue"),
        (["--workers", "0"], "--workers"),
    ],
)
def test_bad_values_exit_2(tmp_path, capsys, flags, message):
    assert main(["prep", "x.svs", "--out", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err


def test_shards_split_sorted_inputs(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    img = tissue_image(64, 64, box=(0, 0, 1, 1)).transpose(2, 0, 1)
    paths = []
    for i in range(5):
        np.save(src / f"s{i}.npy", img)
        paths.append(str(src / f"s{i}.npy"))
    done = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        assert (
            main(
                [
                    "prep",
                    *reversed(paths),
                    "--out",
                    str(out),
                    "--patch-size",
                    "32",
                    "--shard",
                    f"{i}/2",
                    "--no-thumbnail",
                ]
            )
            == 0
        )
        done.append(sorted(p.name for p in out.glob("*.zarr")))
    assert done == [["s0.zarr", "s2.zarr", "s4.zarr"], ["s1.zarr", "s3.zarr"]]  # i-th of every n, 0-based
    assert parse_shard("0/1") == (0, 1)


def test_duplicate_slide_ids_fail(tmp_path, capsys):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        np.save(tmp_path / sub / "x.npy", tissue_image(64, 64, box=(0, 0, 1, 1)).transpose(2, 0, 1))
    status = main(
        [
            "prep",
            str(tmp_path / "a/x.npy"),
            str(tmp_path / "b/x.npy"),
            "--out",
            str(tmp_path / "o"),
            "--patch-size",
            "32",
        ]
    )
    assert status == 1 and "duplicate slide_id 'x'" in capsys.readouterr().err
    assert is_complete(tmp_path / "o" / "x.zarr")


def test_workers_run_in_processes(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    paths = [
        str(write_pyramid_tiff(src / f"w{i}.tif", tissue_image(96, 96, seed=i), levels=1, tile=32))
        for i in range(3)
    ]
    (src / "bad.tif").write_bytes(b"nope")
    status = main(
        [
            "prep",
            *paths,
            str(src / "bad.tif"),
            "--out",
            str(tmp_path / "o"),
            "--workers",
            "2",
            "--patch-size",
            "32",
            "--no-thumbnail",
        ]
    )
    captured = capsys.readouterr()
    assert status == 1 and "bad.tif: unsupported format" in captured.err
    assert all(is_complete(tmp_path / "o" / f"w{i}.zarr") for i in range(3))
    assert "3 done, 1 failed" in captured.out


def test_summary_table_lists_failures_last():
    rows = [
        PrepResult("b.svs", "b", "failed", reason="file not found"),
        PrepResult("a.svs", "a", "done", Path("o/a.zarr"), 12, 1.5),
    ]
    table = summary_table(rows).splitlines()
    assert table[0].split() == ["slide_id", "status", "patches", "seconds", "store", "/", "reason"]
    assert table[1].startswith("a ") and "o/a.zarr" in table[1]
    assert table[2].startswith("b ") and table[2].endswith("file not found")
    assert table[-1] == "1 done, 1 failed"


def test_reader_override(tmp_path, capsys):
    src = write_pyramid_tiff(tmp_path / "g.tif", tissue_image(128, 128), levels=1, tile=32)
    assert (
        main(["prep", str(src), "--out", str(tmp_path / "o"), "--patch-size", "32", "--reader", "openslide"])
        == 0
    )
    import zarr

    prov = zarr.open_group(str(tmp_path / "o" / "g.zarr"), mode="r").attrs["ips"]["provenance"]
    assert prov["reader"] == "openslide" and prov["vendor"] == "generic-tiff"


def test_slurm_job_array_script_runs_its_share(tmp_path):
    """tools/slurm_prep.sh: task i of n runs `ips prep ... --shard i/n`; the shards cover every input once."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "slurm_prep.sh"
    stub = tmp_path / "ips"
    stub.write_text('#!/bin/sh\necho "$@"\n')
    stub.chmod(0o755)
    for i in range(3):
        env = {
            "PATH": "/usr/bin:/bin",
            "IPS": str(stub),
            "SLURM_ARRAY_TASK_ID": str(i),
            "SLURM_ARRAY_TASK_COUNT": "3",
            "SLURM_CPUS_PER_TASK": "4",
        }
        out = subprocess.run(
            ["bash", str(script), "--out", "stores", "a.svs", "b.svs"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert out == f"prep --out stores a.svs b.svs --workers 4 --shard {i}/3"
    missing = subprocess.run(
        ["bash", str(script), "x.svs"], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "job array" in missing.stderr


def test_threads_beyond_the_cores_are_lowered_with_a_warning(tmp_path, capsys):
    import os

    src = write_pyramid_tiff(tmp_path / "a.tif", tissue_image(96, 96, seed=0), levels=1, tile=32)
    rc = main(["prep", str(src), "--out", str(tmp_path / "o"), "--patch-size", "32", "--threads", "100000"])
    cores = os.cpu_count()
    assert (
        rc == 0
        and f"--threads 100000 is more than the {cores} cores; using {cores}" in capsys.readouterr().err
    )
    assert is_complete(tmp_path / "o" / "a.zarr")


def test_an_unexpected_error_of_one_input_is_one_line_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    """What prep_file does not turn into a failed result itself (a bug, a library's own error) fails that
    input alone, in one line, through the one per-input loop."""
    import data_prep.convert as convert

    srcs = [
        write_pyramid_tiff(tmp_path / f"{n}.tif", tissue_image(96, 96, seed=i), levels=1, tile=32)
        for i, n in enumerate("ab")
    ]
    real = convert.prep_file

    def flaky(source, out, **kw):
        if Path(source).name == "a.tif":
            raise RuntimeError("boom\nsecond line")
        return real(source, out, **kw)

    monkeypatch.setattr(convert, "prep_file", flaky)
    rc = main(["prep", *map(str, srcs), "--out", str(tmp_path / "o"), "--patch-size", "32", "--no-thumbnail"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ips prep: FAILED")]
    assert rc == 1 and err == [f"ips prep: FAILED {srcs[0]}: RuntimeError: boom"]
    assert is_complete(tmp_path / "o" / "b.zarr")
