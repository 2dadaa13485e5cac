"""`ips heatmap --manifest M --split S`, and the commands `ips demo` prints: each one parses and the ones
that do not train run as printed, from a folder whose name needs quoting."""

from __future__ import annotations

import shlex

import pytest
from inference_fixtures import make_store, tiny_cfg, write_checkpoint

from ips.cli.main import build_parser, main, parse
from ips.config import save_config
from ips.demo import DemoPaths, DemoResult, demo_commands, summary, view_command


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    """A folder laid out as `ips demo` leaves it (data/manifest.csv, run/checkpoints/best.pt,
    config.yaml), under a name with a space, with tiny stores and an untrained checkpoint. The manifest's
    slide ids are not the stores' names."""
    out = tmp_path_factory.mktemp("cmds") / "my demo"
    for i in range(5):
        make_store(out / "data" / "stores", f"s{i}", size=(48, 32), patch=16, seed=i)
    cfg = tiny_cfg(tasks=[{"name": "label", "kind": "binary"}], memory_size=2, iter_size=4)
    (out / "run" / "checkpoints").mkdir(parents=True)
    write_checkpoint(out / "run" / "checkpoints" / "best.pt", cfg)
    save_config(cfg, out / "config.yaml")
    splits = ["train", "train", "train", "test", "test"]
    rows = [f"case_{i},stores/s{i}.zarr,{i % 2},{split}" for i, split in enumerate(splits)]
    (out / "data" / "manifest.csv").write_text("slide_id,path,label,split\n" + "\n".join(rows) + "\n")
    paths = DemoPaths(
        out / "config.yaml",
        out / "data" / "manifest.csv",
        out / "run" / "checkpoints" / "best.pt",
        out / "predictions",
        out / "heatmaps",
    )
    return out, paths


def test_heatmap_of_one_split_of_a_manifest_draws_exactly_its_slides(demo_like, tmp_path, capsys):
    out, paths = demo_like
    base = ["heatmap", "--checkpoint", str(paths.checkpoint), "--out", str(tmp_path / "h"), "--top-k", "0"]
    assert main([*base, "--manifest", str(paths.manifest), "--split", "test", "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["case_3", "case_4"]  # the manifest's ids
    assert (tmp_path / "h" / "case_3" / "heatmap.png").is_file()
    assert main([*base, "--split", "test", str(out / "data" / "stores" / "s0.zarr")]) == 2
    assert "--split needs --manifest" in capsys.readouterr().err
    only_train = tmp_path / "train_only.csv"
    only_train.write_text(f"slide_id,path,label,split\na,{out / 'data' / 'stores' / 's0.zarr'},1,train\n")
    assert main([*base, "--manifest", str(only_train), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "no slides in" in err and "of split test" in err


def test_every_printed_command_parses_and_those_that_do_not_train_run_as_printed(demo_like, capsys):
    out, paths = demo_like
    commands = demo_commands(paths, device="cpu", threads=1)
    assert set(commands) == {"train", "predict", "heatmap", "suggest"}
    for name, line in commands.items():
        assert "<" not in line and ">" not in line, line  # no placeholders
        argv = shlex.split(line)
        assert argv[:2] == ["ips", name]
        args = parse(build_parser(), argv[1:])
        assert args.command == name
        if name == "train":  # trains: parsed, and what it reads exists
            assert (
                args.config == str(paths.config) and paths.config.is_file() and args.out == str(out / "run")
            )
            continue
        assert args.manifest == str(paths.manifest) and args.checkpoint in (
            str(paths.checkpoint),
            [str(paths.checkpoint)],
        )
        assert main(argv[1:]) == 0, capsys.readouterr().err
    assert (paths.predictions / "predictions.csv").is_file()
    assert sorted(p.name for p in paths.heatmaps.iterdir()) == ["case_3", "case_4"]
    suggested = (out / "suggest" / "suggestions.csv").read_text().splitlines()
    assert suggested[0].startswith("slide_id,score,rank") and len(suggested) == 1 + 3
    assert all(line.split(",")[0] in {"case_0", "case_1", "case_2"} for line in suggested[1:])  # train only


def test_the_summary_names_real_files_and_a_view_command_that_parses(demo_like):
    out, paths = demo_like
    files = {
        "manifest": str(paths.manifest),
        "heatmaps": str(paths.heatmaps),
        "predictions": str(paths.predictions / "predictions.csv"),
        "heatmap_png": str(paths.heatmaps / "case_3" / "heatmap.png"),
    }
    result = DemoResult(out, files=files, commands={"suggest": demo_commands(paths)["suggest"]})
    text = summary(result)
    assert "<" not in text and ">" not in text.replace(">=", "")  # no <slide_id> to fill in by hand
    view = shlex.split(view_command(files))
    args = parse(build_parser(), view[1:])
    assert (
        args.command == "view"
        and args.manifest == str(paths.manifest)
        and args.heatmaps == str(paths.heatmaps)
    )
    assert demo_commands(paths)["suggest"] in text
