"""Training never mixes two runs, never half-refuses, and says what it will not do; a resumed run reads
the data of the run it resumes; `ips pretrain` holds the same run lock."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import yaml
from train_fixtures import make_cross_slides, tiny_config

from ips.cli.main import main
from ips.config import with_overrides
from ips.errors import CheckpointError, ConfigError, RunDirError
from ips.model.checkpoint import load_checkpoint, load_model
from ips.training import distributed
from ips.training.loop import train
from ips.training.rundir import RunLock, config_changes

QUIET = {"show_progress": False, "log": lambda s: None}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_cross_slides(tmp_path_factory.mktemp("cross"), n_train=8, n_val=4)


@pytest.fixture(scope="module")
def no_val_data(tmp_path_factory) -> Path:
    return make_cross_slides(tmp_path_factory.mktemp("noval"), n_train=8, n_val=0)


def test_a_second_run_in_the_same_directory_refuses_naming_the_holder(tmp_path, data):
    run = tmp_path / "run"
    with RunLock(run):  # what a running `ips train` holds
        with pytest.raises(
            RunDirError, match=rf"another run.*PID {os.getpid()} on host {socket.gethostname()}"
        ):
            train(tiny_config(), manifest=data, run_dir=run, **QUIET)
    assert not (run / "config.yaml").exists()  # the refused run wrote nothing
    train(
        tiny_config(train={**tiny_config().train.__dict__, "epochs": 1}), manifest=data, run_dir=run, **QUIET
    )
    assert (run / "checkpoints" / "last.pt").is_file()  # the lock is free again once the holder ends


def test_the_lock_is_released_when_training_fails(tmp_path, data):
    run = tmp_path / "run"
    with pytest.raises(ConfigError):
        train(
            tiny_config(train={**tiny_config().train.__dict__, "monitor": "val_acuracy"}),
            manifest=data,
            run_dir=run,
            **QUIET,
        )
    RunLock(run).acquire().release()  # would raise RunDirError if the failed run still held it


def test_no_resume_refuses_a_directory_that_holds_a_run(tmp_path, data):
    run = tmp_path / "run"
    cfg = tiny_config(train={**tiny_config().train.__dict__, "epochs": 1})
    train(cfg, manifest=data, run_dir=run, **QUIET)
    metrics = (run / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match=r"holds a previous run \(config.yaml, metrics.jsonl"):
        train(cfg, manifest=data, run_dir=run, resume=False, **QUIET)
    assert (run / "metrics.jsonl").read_text() == metrics  # nothing appended
    train(cfg, manifest=data, run_dir=tmp_path / "empty", resume=False, **QUIET)  # a new folder is fine


def test_resume_with_more_epochs_continues_from_the_last_epoch(tmp_path, data):
    run, lines = tmp_path / "run", []
    cfg = tiny_config(train={**tiny_config().train.__dict__, "epochs": 2})
    train(cfg, manifest=data, run_dir=run, **QUIET)
    longer = with_overrides(cfg, train={"epochs": 7, "device": "cpu"})
    result = train(longer, manifest=data, run_dir=run, show_progress=False, log=lines.append)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4, 5, 6, 7]
    assert any("resumed from" in line and "after epoch 2" in line for line in lines), lines
    assert any("train.epochs: 2 -> 7" in line for line in lines), lines
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 7


def test_resume_names_every_refused_key():
    saved = tiny_config().to_dict()
    new = with_overrides(
        tiny_config(), train={"lr": 1e-4, "epochs": 9}, selection={"memory_size": 2}
    ).to_dict()
    accepted, refused = config_changes(saved, new)
    assert accepted == ["train.epochs: 3 -> 9"]
    assert refused == ["selection.memory_size: 4 -> 2", "train.lr: 0.003 -> 0.0001"]


def test_misspelled_monitor_is_an_error_naming_the_closest(tmp_path, data):
    cfg = tiny_config(train={**tiny_config().train.__dict__, "monitor": "val_label/acuracy"})
    with pytest.raises(
        ConfigError,
        match=r"train.monitor: unknown metric 'val_label/acuracy' \(did you mean "
        r"'val_label/accuracy'\?\)",
    ):
        train(cfg, manifest=data, run_dir=tmp_path / "run", **QUIET)


def test_warns_without_a_val_split_and_with_a_single_class(tmp_path, no_val_data):
    lines: list[str] = []
    cfg = tiny_config(train={**tiny_config().train.__dict__, "epochs": 1})
    result = train(cfg, manifest=no_val_data, run_dir=tmp_path / "run", show_progress=False, log=lines.append)
    assert any("no val split" in line and "train_loss" in line for line in lines), lines
    assert result.monitor == "train_loss"
    one_class = tmp_path / "one.csv"
    rows = no_val_data.read_text().splitlines()
    label = rows[0].split(",").index("label")
    positives = [
        r.replace(r.split(",")[1], str(no_val_data.parent / r.split(",")[1]))
        for r in rows[1:]
        if r.split(",")[label] == "1"
    ]
    one_class.write_text("\n".join([rows[0], *positives]) + "\n")
    lines.clear()
    train(cfg, manifest=one_class, run_dir=tmp_path / "one", show_progress=False, log=lines.append)
    assert any("every training slide has the label 1" in line for line in lines), lines


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_unusable_checkpoints_fail_in_one_line(tmp_path, content, capsys):
    path = tmp_path / "ckpt.pt"
    if content is None:
        path.mkdir()
        match = "is a directory"
    else:
        path.write_bytes(content)
        match = "is empty" if not content else "cannot be read"
    with pytest.raises(CheckpointError, match=match):
        load_model(path)
    rc = main(["predict", "--checkpoint", str(path), str(tmp_path / "x.zarr"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("ips predict: checkpoint error: "), err
    assert str(path) in err[0]


@pytest.mark.parametrize("command", ["predict", "heatmap", "demo", "train"])
def test_out_naming_an_existing_file_is_bad_usage(tmp_path, command, capsys, data):
    target = tmp_path / "taken"
    target.write_text("x")
    argv = {
        "predict": ["predict", "--checkpoint", "c.pt", "--manifest", str(data), "--out", str(target)],
        "heatmap": ["heatmap", "--checkpoint", "c.pt", "s.zarr", "--out", str(target)],
        "demo": ["demo", "--out", str(target)],
        "train": [
            "train",
            "--config",
            str(tmp_path / "cfg.yaml"),
            "--manifest",
            str(data),
            "--out",
            str(target),
        ],
    }[command]
    (tmp_path / "cfg.yaml").write_text("model: {encoder: ips_cnn_tiny, in_chans: 1, patch_size: 8}\n")
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert any(f"--out {target} exists and is not a directory" in line for line in err), err


def test_collectives_use_the_backends_device(monkeypatch):
    """NCCL takes only CUDA tensors: the flag is broadcast from the rank's GPU; gloo from the CPU."""
    cuda1 = torch.device("cuda", 1)
    assert distributed.collective_device("nccl", cuda1) == cuda1
    assert distributed.collective_device("gloo", cuda1) == torch.device("cpu")
    assert distributed.collective_device("gloo", torch.device("cpu")) == torch.device("cpu")

    sent: list[torch.Tensor] = []
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(distributed.dist, "broadcast", lambda t, src: sent.append(t))
    # no GPU here: stand in `meta` for the CUDA device a NCCL rank would use, and check the flag goes there
    monkeypatch.setattr(
        distributed,
        "collective_device",
        lambda backend, device: torch.device("meta") if backend == "nccl" else torch.device("cpu"),
    )
    with pytest.raises(RuntimeError, match="meta"):  # .item() of a meta tensor: it was on the stand-in device
        distributed.broadcast_flag(True, distributed.DistInfo(rank=0, world_size=2), torch.device("cpu"))
    assert sent and sent[0].device.type == "meta"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_collective_device_on_cuda():
    assert distributed.collective_device("nccl", torch.device("cuda", 0)).type == "cuda"


# --- a resumed run reads the data of the run it resumes ------------------------------------------------


def _flipped(manifest: Path, name: str, column: str = "label") -> Path:
    """A copy of `manifest` beside it (same relative store paths) with every `column` value changed."""
    rows = manifest.read_text().splitlines()
    header = rows[0].split(",")
    i = header.index(column)
    out = []
    for row in rows[1:]:
        cells = row.split(",")
        cells[i] = {"0": "1", "1": "0", "train": "val", "val": "train"}[cells[i]]
        out.append(",".join(cells))
    path = manifest.with_name(name)
    path.write_text("\n".join([rows[0], *out]) + "\n")
    return path


@pytest.mark.parametrize("column", ["label", "split"])
def test_resume_on_a_changed_manifest_is_refused_naming_overwrite(tmp_path, data, column, capsys):
    run = tmp_path / "run"
    cfg = tiny_config(train={**tiny_config().train.__dict__, "epochs": 2})
    train(cfg, manifest=data, run_dir=run, stop_after_epochs=1, **QUIET)
    last = (run / "checkpoints" / "last.pt").read_bytes()
    changed = _flipped(data, f"flipped_{column}.csv", column)
    with pytest.raises(
        RunDirError, match=r"cannot resume on different data \(.*manifest rows changed.*--overwrite"
    ):
        train(cfg, manifest=changed, run_dir=run, **QUIET)
    assert (run / "checkpoints" / "last.pt").read_bytes() == last  # the refused run changed nothing
    # the CLI: one line, exit 2; --overwrite starts over on the new data
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    argv = ["train", "--config", str(tmp_path / "cfg.yaml"), "--manifest", str(changed), "--out", str(run)]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot resume on different data" in err[0] and "--overwrite" in err[0], err
    assert main([*argv, "--quiet", "--overwrite", "train.epochs=1"]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1  # a new run, not a resumed one


def test_resume_on_a_rebuilt_store_is_refused(tmp_path, data):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(data.parent, folder)
    manifest = folder / data.name
    run = tmp_path / "run"
    cfg = tiny_config(train={**tiny_config().train.__dict__, "epochs": 2})
    train(cfg, manifest=manifest, run_dir=run, stop_after_epochs=1, **QUIET)
    # s001 rebuilt from the pixels of s000 (another store with the same name): its marker's checksums differ
    shutil.rmtree(folder / "s001.zarr")
    shutil.copytree(folder / "s000.zarr", folder / "s001.zarr")
    with pytest.raises(RunDirError, match=r"stores changed: 1 \(s001\)"):
        train(cfg, manifest=manifest, run_dir=run, **QUIET)


def test_resume_on_the_same_data_goes_on_and_records_them(tmp_path, data):
    run = tmp_path / "run"
    cfg = tiny_config(train={**tiny_config().train.__dict__, "epochs": 2})
    train(cfg, manifest=data, run_dir=run, stop_after_epochs=1, **QUIET)
    record = json.loads((run / "data.json").read_text())["slides"]
    assert sorted(record) == [f"s{i:03d}" for i in range(12)]  # 8 train + 4 val rows, one entry each
    # the same rows in another order, written by another program: still the same data
    rows = data.read_text().splitlines()
    same = data.with_name("reordered.csv")
    same.write_text("\n".join([rows[0], *reversed(rows[1:])]) + "\n")
    result = train(cfg, manifest=same, run_dir=run, **QUIET)
    assert [r["epoch"] for r in result.history] == [1, 2]


# --- ips pretrain holds the run lock of ips train ---------------------------------------------------------


def test_pretrain_refuses_a_directory_in_use(tmp_path, capsys):
    out = tmp_path / "pt"
    (tmp_path / "cfg.yaml").write_text("model: {encoder: ips_cnn_tiny, in_chans: 1, patch_size: 8}\n")
    argv = ["pretrain", str(tmp_path / "s.zarr"), "--config", str(tmp_path / "cfg.yaml"), "--out", str(out)]
    with RunLock(out):  # what a running `ips train` or `ips pretrain` holds
        assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"another run is using this run directory (PID {os.getpid()}" in err[0], err


def test_pretrain_holds_the_lock_while_it_runs(tmp_path, monkeypatch):
    import ips.pretrain

    out, seen = tmp_path / "pt", []

    def fake(cfg, stores, out_dir, **kw):
        with pytest.raises(RunDirError, match="another run is using"):
            RunLock(Path(out_dir)).acquire()  # a second pretraining (or train) into the same --out
        seen.append(out_dir)
        return {"encoder": Path(out_dir) / "encoder.pt", "method": "simclr", "losses": [1.0], "seconds": 0.0}

    monkeypatch.setattr(ips.pretrain, "pretrain_encoder", fake)
    (tmp_path / "cfg.yaml").write_text("model: {encoder: ips_cnn_tiny, in_chans: 1, patch_size: 8}\n")
    argv = ["pretrain", "s.zarr", "--config", str(tmp_path / "cfg.yaml"), "--out", str(out), "--quiet"]
    assert main(argv) == 0 and seen
    RunLock(out).acquire().release()  # free again once it ended


def test_the_store_digest_covers_what_the_run_reads_and_nothing_else(tmp_path):
    """Another grid or feature set added to a store later (`ips prep --grid`, `ips embed`) leaves a
    resumable run resumable; other pixels, mask or grid do not."""
    from ips.config import DataConfig
    from ips.format.names import COMPLETE_MARKER
    from ips.training.rundir import store_digest

    store = tmp_path / "x.zarr"
    store.mkdir()
    arrays = {
        "0": {"c/0/0/0": [100, 1]},
        "mask": {"c/0/0": [10, 2]},
        "grids/default/coords": {"c/0/0": [12, 3]},
        "features/default/emb": {"c/0/0": [50, 4]},
    }

    def digest(changes: dict, data: DataConfig | None = None) -> str | None:
        (store / COMPLETE_MARKER).write_text(
            json.dumps({"format_version": 2, "arrays": {**arrays, **changes}})
        )
        return store_digest(str(store), data or DataConfig())

    base = digest({})
    assert base is not None
    assert digest({"grids/fine/coords": {"c/0/0": [9, 9]}}) == base  # a grid added later
    assert digest({"features/default/emb": {"c/0/0": [51, 5]}}) == base  # features: not read in pixels mode
    assert digest({"0": {"c/0/0/0": [100, 7]}}) != base  # other pixels
    assert digest({"mask": {"c/0/0": [10, 8]}}) != base
    assert digest({"grids/default/coords": {"c/0/0": [12, 9]}}) != base
    features = DataConfig(mode="features")
    assert digest({}, features) != digest({"features/default/emb": {"c/0/0": [51, 5]}}, features)
    assert store_digest(str(tmp_path / "missing.zarr"), DataConfig()) is None  # its reader says why
