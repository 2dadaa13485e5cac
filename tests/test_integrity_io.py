"""Every I/O failure is one line naming the file and what happened (a full disk, a read-only or
unwritable folder, a file where a folder must be, a remote bucket that is not there, a file that is not
what it claims), never a traceback; non-finite numbers and unbounded thread counts are refused up front.

Failures are injected: a monkeypatched write raising the errno a full disk or a read-only mount gives,
torch's own message for a failed checkpoint write, a local S3 server without the bucket."""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from s3_fixtures import s3_session
from train_fixtures import make_cross_slides, tiny_config

from ips.cli.main import main
from ips.errors import CheckpointError, ConfigError, WriteError, one_line, remote_reason
from ips.model.checkpoint import load_checkpoint, save_checkpoint
from ips.model.ips_model import build_model

PRETRAIN_TINY = {"epochs": 1, "batch_size": 8, "patches_per_slide": 4, "patches_per_epoch": 16}
TORCH_ENOSPC = "[enforce fail at inline_container.cc:672] . unexpected pos 4288 vs 4176"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_cross_slides(tmp_path_factory.mktemp("io"), n_train=4, n_val=2)


@pytest.fixture(scope="module")
def s3():
    yield from s3_session()


@pytest.fixture
def cfg_file(tmp_path) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(
        yaml.safe_dump(tiny_config(train={**tiny_config().train.__dict__, "epochs": 1}).to_dict())
    )
    return path


def one_error_line(capsys, command: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith(f"ips {command}: ") and "Traceback" not in err[0], err
    return err[0]


# --- a full disk -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["torch", "oserror"])
def test_a_checkpoint_write_on_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, failure):
    cfg = tiny_config()
    model = build_model(cfg.model)
    path = tmp_path / "last.pt"
    save_checkpoint(path, model=model, config=cfg, epoch=1, metrics={})
    before = path.read_bytes()

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")  # what a full disk leaves before the write fails
        if failure == "torch":
            raise RuntimeError(TORCH_ENOSPC)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(WriteError) as e:
        save_checkpoint(path, model=model, config=cfg, epoch=2, metrics={})
    text = str(e.value)
    assert text.startswith(f"{path}: cannot write (") and "\n" not in text
    assert ("No space left on device (ENOSPC)" if failure == "oserror" else "disk full") in text
    assert path.read_bytes() == before  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
    assert load_checkpoint(path)["epoch"] == 1


def test_train_on_a_full_disk_exits_1_with_one_line(tmp_path, data, cfg_file, monkeypatch, capsys):
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(TORCH_ENOSPC)))
    out = tmp_path / "run"
    rc = main(["train", "--config", str(cfg_file), "--manifest", str(data), "--out", str(out), "--quiet"])
    line = one_error_line(capsys, "train")
    assert rc == 1 and str(out / "checkpoints") in line and "cannot write" in line, line


def test_pretrain_on_a_full_disk_exits_1_with_one_line(tmp_path, data, monkeypatch, capsys):
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(TORCH_ENOSPC)))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**tiny_config().to_dict(), "pretrain": PRETRAIN_TINY}))
    stores = [str(p) for p in sorted(data.parent.glob("*.zarr"))[:2]]
    out = tmp_path / "pt"
    rc = main(["pretrain", *stores, "--config", str(cfg), "--out", str(out), "--quiet"])
    line = one_error_line(capsys, "pretrain")
    assert rc == 1 and str(out) in line and "cannot write" in line, line


def test_predictions_csv_on_a_full_disk_is_one_line_naming_it(tmp_path, data, monkeypatch, capsys):
    import csv

    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, model=build_model(tiny_config().model), config=tiny_config(), epoch=0, metrics={})

    def full(self, rows):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", full)
    out = tmp_path / "p"
    rc = main(["predict", "--checkpoint", str(ckpt), "--manifest", str(data), "--out", str(out), "--quiet"])
    line = one_error_line(capsys, "predict")
    assert rc == 1 and line == f"ips predict: {out / 'predictions.csv'}: No space left on device (ENOSPC)"


# --- folders that cannot be written ---------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_an_unwritable_out_is_one_line(tmp_path, data, cfg_file, monkeypatch, capsys, code):
    """What a read-only mount (EROFS) or a folder without write permission (EACCES) answers."""
    locked = tmp_path / "ro"
    locked.mkdir()
    real_mkdir = Path.mkdir

    def refuse(self, *a, **k):
        if str(self).startswith(str(locked)):
            raise OSError(code, os.strerror(code), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", refuse)
    out = locked / "run"
    rc = main(["train", "--config", str(cfg_file), "--manifest", str(data), "--out", str(out), "--quiet"])
    line = one_error_line(capsys, "train")
    name = errno.errorcode[code]
    assert rc == 1 and f"{out}: {os.strerror(code)} ({name})" in line, line


@pytest.mark.parametrize("how", ["mkdir", "access"])
def test_prep_into_an_unwritable_out_is_one_line(tmp_path, monkeypatch, capsys, how):
    from data_prep.testing import tissue_image, write_pyramid_tiff

    srcs = [
        write_pyramid_tiff(tmp_path / f"{n}.tif", tissue_image(96, 96, seed=0), levels=1, tile=32)
        for n in "ab"
    ]
    out = tmp_path / "ro" / "stores"
    if how == "mkdir":  # a read-only mount refuses to make the folder
        monkeypatch.setattr(
            Path,
            "mkdir",
            lambda self, *a, **k: (_ for _ in ()).throw(
                OSError(errno.EROFS, "Read-only file system", str(self))
            ),
        )
    else:  # the folder exists but cannot be written into
        out.mkdir(parents=True)
        real = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode, **k: False if Path(p) == out else real(p, mode, **k)
        )
    rc = main(["prep", *map(str, srcs), "--out", str(out), "--patch-size", "32"])
    line = one_error_line(capsys, "prep")
    want = f"{out}: Read-only file system (EROFS)" if how == "mkdir" else f"{out}: cannot write into it"
    assert rc == 1 and want in line, line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_for_real(tmp_path, data, cfg_file, capsys):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc = main(["train", "--config", str(cfg_file), "--manifest", str(data), "--out", str(locked / "run")])
    finally:
        locked.chmod(0o700)
    line = one_error_line(capsys, "train")
    assert rc == 1 and "Permission denied (EACCES)" in line, line


@pytest.mark.parametrize("command", ["train", "predict", "pretrain", "heatmap"])
def test_a_file_inside_the_out_path_is_one_line(tmp_path, data, cfg_file, capsys, command):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    out = blocker / "sub"  # ENOTDIR: a file where a folder must be
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, model=build_model(tiny_config().model), config=tiny_config(), epoch=0, metrics={})
    stores = [str(p) for p in sorted(data.parent.glob("*.zarr"))[:2]]
    argv = {
        "train": ["train", "--config", str(cfg_file), "--manifest", str(data)],
        "predict": ["predict", "--checkpoint", str(ckpt), "--manifest", str(data)],
        "pretrain": ["pretrain", *stores, "--config", str(cfg_file), "pretrain.epochs=1"],
        "heatmap": ["heatmap", "--checkpoint", str(ckpt), *stores],
    }[command]
    rc = main([*argv, "--out", str(out), "--quiet"])
    line = one_error_line(capsys, command)
    assert rc in (1, 2) and "Not a directory (ENOTDIR)" in line and str(blocker) in line, line


def test_pretrain_out_naming_a_file_is_bad_usage(tmp_path, cfg_file, capsys):
    target = tmp_path / "taken"
    target.write_text("x")
    rc = main(["pretrain", "s.zarr", "--config", str(cfg_file), "--out", str(target)])
    assert rc == 2 and f"--out {target} exists and is not a directory" in one_error_line(capsys, "pretrain")


# --- remote stores ------------------------------------------------------------------------------------------


def test_prep_into_a_missing_bucket_is_one_line(tmp_path, s3, capsys):
    from data_prep.testing import tissue_image, write_pyramid_tiff

    src = write_pyramid_tiff(tmp_path / "a.tif", tissue_image(128, 128, seed=0), levels=1, tile=64)
    rc = main(["prep", str(src), "--out", "s3://nosuchbucket/x", "--patch-size", "32", "--no-thumbnail"])
    line = one_error_line(capsys, "prep")
    assert rc == 1 and line.startswith(
        "ips prep: --out s3://nosuchbucket/x: cannot write there (NoSuchBucket: "
    )


def test_prep_without_credentials_is_one_line(tmp_path, s3, monkeypatch, capsys):
    from data_prep.testing import tissue_image, write_pyramid_tiff

    src = write_pyramid_tiff(tmp_path / "a.tif", tissue_image(128, 128, seed=0), levels=1, tile=64)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    url = s3.url("nocreds")
    rc = main(["prep", str(src), "--out", url, "--patch-size", "32", "--no-thumbnail"])
    line = one_error_line(capsys, "prep")
    assert rc == 1 and line.startswith(f"ips prep: --out {url}: cannot write there (HTTP 403"), line


def test_prep_to_an_unreachable_server_is_one_line_within_seconds(tmp_path, monkeypatch, capsys):
    import socket
    import time

    pytest.importorskip("obstore", reason="remote stores need obstore")
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    t0 = time.monotonic()
    rc = main(["prep", str(tmp_path / "a.tif"), "--out", "s3://bucket/x"])
    line = one_error_line(capsys, "prep")
    assert rc == 1 and "cannot reach the server" in line and time.monotonic() - t0 < 30, line


def test_prep_to_an_unsupported_scheme_is_one_usage_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prep", "a.tif", "--out", "ftp://host/x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "unsupported URL scheme 'ftp'" in err[-1] and "Traceback" not in "".join(err)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (
            "Generic S3 error: Error performing list request: Server returned non-2xx status code: 404 Not "
            "Found: <?xml version='1.0'?><Error><Code>NoSuchBucket</Code><Message>The specified bucket does "
            "not exist</Message></Error>\n\nDebug source:\nGeneric {...}",
            "NoSuchBucket: The specified bucket does not exist",
        ),
        (
            "Generic S3 error: Error performing put request: Server returned non-2xx status code: 403 "
            "Forbidden: <Error><Code>InvalidAccessKeyId</Code><Message>The AWS Access Key Id you provided "
            "does not exist in our records.</Message></Error>",
            "InvalidAccessKeyId: The AWS Access Key Id you provided does not exist in our records.",
        ),
        (
            "Generic S3 error: Server returned non-2xx status code: 403 Forbidden: \n\nDebug",
            "HTTP 403 (access",
        ),
        (
            "Generic S3 error: Error performing GET http://127.0.0.1:9/b in 5.8s, after 10 retries, "
            "max_retries: 10 - HTTP error: error sending request\n\nDebug source: ...",
            "cannot reach the server after 10 retries",
        ),
        (
            "Generic S3 error: Error getting credentials: Missing region\n\nDebug source:\nGeneric {}",
            "Generic S3 error: Error getting credentials: Missing region",
        ),
    ],
)
def test_object_store_errors_become_one_short_reason(message, reason):
    class GenericError(Exception):
        pass

    GenericError.__module__ = "obstore.exceptions"  # what obstore raises
    e = GenericError(message)
    assert remote_reason(e).startswith(reason) and "\n" not in remote_reason(e)
    assert one_line(e) == f"object store: {remote_reason(e)}"


# --- files that are not what they claim --------------------------------------------------------------------


def test_a_zero_byte_pretrained_file_is_one_config_line(tmp_path):
    from ips.model.encoders import build_encoder

    empty = tmp_path / "encoder.pt"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"^model.pretrained: {empty} is empty \(0 bytes\)"):
        build_encoder(
            "ips_cnn_tiny", in_chans=1, spatial_dims=2, patch_size=8, pretrained=str(empty), norm="group"
        )


@pytest.mark.parametrize("content", [b"garbage" * 50, "tensor", b""])
def test_a_garbage_pretraining_state_is_one_line(tmp_path, data, content, capsys):
    out = tmp_path / "pt"
    out.mkdir()
    if content == "tensor":
        torch.save(torch.zeros(3), out / "state.pt")  # loads as data, but is no pretraining state
    else:
        (out / "state.pt").write_bytes(content)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**tiny_config().to_dict(), "pretrain": PRETRAIN_TINY}))
    stores = [str(p) for p in sorted(data.parent.glob("*.zarr"))[:2]]
    rc = main(["pretrain", *stores, "--config", str(cfg), "--out", str(out), "--quiet"])
    line = one_error_line(capsys, "pretrain")
    assert rc == 2 and str(out / "state.pt") in line, line


def test_a_checkpoint_holding_code_is_refused_without_torch_advice(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": "ips-checkpoint-1", "x": Payload()}))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    text = str(e.value)
    assert "refused by the data-only loader" in text and "\n" not in text
    assert "weights_only" not in text and "likely succeed" not in text


def test_a_non_utf8_manifest_is_one_line_naming_the_row(tmp_path, data, cfg_file, capsys):
    rows = data.read_text().splitlines()
    latin = tmp_path / "latin1.csv"
    rows[2] = rows[2].replace(rows[2].split(",")[0], "café", 1)
    latin.write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    rc = main(["train", "--config", str(cfg_file), "--manifest", str(latin), "--out", str(tmp_path / "r")])
    line = one_error_line(capsys, "train")
    assert rc == 2 and f"{latin}: row 3: not UTF-8 text (byte 0xe9" in line, line


@pytest.mark.parametrize("override", ["train.lr=inf", "train.grad_clip=.inf", "pretrain.lr=nan"])
def test_non_finite_numbers_are_one_config_line(tmp_path, data, cfg_file, capsys, override):
    rc = main(
        ["train", "--config", str(cfg_file), "--manifest", str(data), "--out", str(tmp_path / "r"), override]
    )
    line = one_error_line(capsys, "train")
    assert rc == 2 and f"config error: {override.split('=')[0]}: must be a finite number" in line, line


# --- bounded threads -----------------------------------------------------------------------------------------


def test_threads_beyond_the_cores_are_lowered_with_a_warning(capsys):
    from ips.cli._threads import apply_threads, available_cores

    before = torch.get_num_threads()
    try:
        assert apply_threads(100000) == available_cores()
        assert torch.get_num_threads() == available_cores()
    finally:
        torch.set_num_threads(before)
    assert f"--threads 100000 is more than the {available_cores()} cores available" in capsys.readouterr().err


def test_negative_threads_are_a_usage_error(tmp_path, capsys):
    rc = main(["predict", "--checkpoint", "c.pt", "s.zarr", "--out", str(tmp_path / "o"), "--threads", "-3"])
    assert rc == 2 and "--threads must be >= 0, got -3" in one_error_line(capsys, "predict")


# --- heatmap folders stay inside --out ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["...zarr", "..zarr", ".hidden.zarr"])
def test_a_store_name_that_cannot_name_a_folder_is_refused(tmp_path, capsys, name):
    store = tmp_path / "in" / name
    store.mkdir(parents=True)
    out = tmp_path / "deep" / "out"
    rc = main(["heatmap", "--checkpoint", str(tmp_path / "c.pt"), str(store), "--out", str(out)])
    line = one_error_line(capsys, "heatmap")
    assert rc == 2 and "cannot name a folder" in line, line
    assert not (tmp_path / "deep").exists()  # nothing written, neither into --out nor its parent
