"""One CLI dialect: the same option means the same thing in every command that has it.

`key=value` overrides wherever a config applies, `--device`/`--quiet`/`--threads` on every command that
runs a model, one redo flag (`--overwrite`), the config's own names, one `(default X)` help style; the
old spellings (`--no-resume`, `--set`, `--grid-name`, `--M/--I/--B`) still parse but are not shown."""

from __future__ import annotations

import argparse

import pytest

from ips.cli.main import build_parser, parse
from ips.config import ConfigError, ExperimentConfig, override_loaded


def subparser(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def options(*path: str) -> set[str]:
    return {o for a in subparser(*path)._actions for o in a.option_strings}


def shown_help(*path: str) -> str:
    return subparser(*path).format_help()


QUIET_TOO = ["prep"]  # no model, but a progress bar: the same --quiet

RUNS_A_MODEL = [
    ("train",),
    ("pretrain",),
    ("predict",),
    ("heatmap",),
    ("embed",),
    ("demo",),
    ("bench", "memory"),
    ("bench", "throughput"),
    ("bench", "encoders"),
]


@pytest.mark.parametrize("path", RUNS_A_MODEL)
def test_every_command_that_runs_a_model_has_device_and_threads(path):
    assert {"--device", "--threads"} <= options(*path)
    if path[0] != "bench":  # the benchmarks print tables, no progress
        assert "--quiet" in options(*path)


@pytest.mark.parametrize("command", ["prep", "embed", "train", "pretrain"])
def test_one_redo_flag(command):
    assert "--overwrite" in options(command) and "--overwrite" in shown_help(command)


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_no_resume_is_a_hidden_alias_of_overwrite(command):
    argv = {
        "train": ["train", "--config", "c.yaml"],
        "pretrain": ["pretrain", "s.zarr", "--config", "c", "--out", "d"],
    }
    args = parse(build_parser(), [*argv[command], "--no-resume"])
    assert args.overwrite is True
    assert "--no-resume" not in shown_help(command)


@pytest.mark.parametrize("command", ["predict", "heatmap"])
def test_overrides_and_stores_share_the_positional_list(command):
    from ips.cli._common import split_overrides

    argv = [command, "--checkpoint", "c.pt", "a.zarr", "--out", "o", "selection.iter_size=64", "b=c.zarr"]
    args = parse(build_parser(), argv)
    stores, overrides = split_overrides(args.stores)
    assert stores == ["a.zarr", "b=c.zarr"] and overrides == ["selection.iter_size=64"]
    assert {"--manifest", "--split"} <= options(command)


def test_pretrain_overrides_are_positional_and_set_stays_hidden():
    args = parse(build_parser(), ["pretrain", "s.zarr", "pretrain.epochs=2", "--config", "c", "--out", "d"])
    assert args.stores == ["s.zarr", "pretrain.epochs=2"]
    args = parse(
        build_parser(), ["pretrain", "s.zarr", "--config", "c", "--out", "d", "--set", "pretrain.lr=1"]
    )
    assert args.set == ["pretrain.lr=1"]
    assert "--set" not in shown_help("pretrain")


def test_train_device_becomes_the_config_key(tmp_path, monkeypatch):
    import ips.training.restarts as restarts
    from ips.cli.main import main

    seen = {}

    def fake_train(cfg, **kw):
        seen["device"] = cfg.train.device
        raise ConfigError("stop here")

    monkeypatch.setattr(restarts, "train_with_restarts", fake_train)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {device: cuda}\n")
    assert (
        main(
            [
                "train",
                "--config",
                str(cfg),
                "--manifest",
                "m.csv",
                "--out",
                str(tmp_path / "r"),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert seen["device"] == "cpu"


def test_overrides_of_a_checkpoint_config_refuse_the_model():
    cfg = ExperimentConfig()
    assert override_loaded(cfg, ["selection.iter_size=64"]).selection.iter_size == 64
    assert override_loaded(cfg, []) is cfg
    with pytest.raises(ConfigError, match=r"model\.\* is fixed by the checkpoint's weights"):
        override_loaded(cfg, ["model.d_model=8"])
    with pytest.raises(ConfigError, match=r"did you mean 'selection.iter_size'"):
        override_loaded(cfg, ["selection.I=64"])


def test_bench_uses_the_config_names_and_one_default_style():
    for kind in ("memory", "throughput", "encoders"):
        text = shown_help("bench", kind)
        assert "(default: None)" not in text and "(default: " not in text, text
    assert {"--memory-size", "--iter-size"} <= options("bench", "memory")
    shown = shown_help("bench", "memory")
    assert "--memory-size" in shown and "--M " not in shown and "--B " not in shown
    args = parse(build_parser(), ["bench", "memory", "--M", "4", "--I", "32", "--B", "3"])
    assert (args.memory_size, args.iter_size, args.batch_size) == (4, 32, 3)
    args = parse(build_parser(), ["bench", "memory", "--memory-size", "5"])
    assert args.memory_size == 5 and args.iter_size == 256


def test_prep_grid_has_the_name_embed_and_the_config_use():
    args = parse(build_parser(), ["prep", "a.tif", "--out", "o", "--grid", "fine"])
    assert args.grid_name == "fine"
    args = parse(build_parser(), ["prep", "a.tif", "--out", "o", "--grid-name", "old"])
    assert args.grid_name == "old" and "--grid-name" not in shown_help("prep")
    assert "--grid" in options("embed")


def test_view_split_is_a_choice(capsys):
    with pytest.raises(SystemExit):
        parse(build_parser(), ["view", "--manifest", "m.csv", "--split", "tset"])
    assert "invalid choice: 'tset'" in capsys.readouterr().err


@pytest.mark.parametrize("command", QUIET_TOO)
def test_quiet_on_commands_with_progress_bars(command):
    assert "--quiet" in options(command)


def test_every_command_has_help():
    """`ips --help` and each subcommand's --help print (a stray % in a help text breaks argparse)."""
    import argparse

    from ips.cli.main import build_parser

    parser = build_parser()
    commands = [[]]
    for action in parser._subparsers._group_actions:  # the subcommands, and theirs (bench, synth)
        for name, sub in action.choices.items():
            commands.append([name])
            for inner in sub._actions:
                if isinstance(inner, argparse._SubParsersAction):
                    commands.extend([name, k] for k in inner.choices)
    assert len(commands) > 15
    for argv in commands:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([*argv, "--help"])
        assert e.value.code == 0, argv
