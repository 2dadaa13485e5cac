"""`--overwrite` removes every file a run wrote, set-aside attempts and seed runs included, and nothing else."""

from pathlib import Path

import yaml
from train_fixtures import TINY

from ips.cli.main import main
from ips.training.restarts import remove_guarded_run

RUN = [
    "config.yaml",
    "metrics.jsonl",
    "metrics.csv",
    "checkpoints/last.pt",
    "checkpoints/best.pt",
    "takeoff.json",
]


def fake_run(run_dir: Path, attempts: int = 0) -> None:
    """The files a guarded run leaves: its own, the data digest, and `attempts` set-aside attempts."""
    for name in [*RUN, "data.json"]:
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("x")
    for k in range(attempts):
        sub = run_dir / "attempts" / f"attempt_{k}"
        for name in [n for n in RUN if n != "takeoff.json"] + ["data.json"]:
            (sub / name).parent.mkdir(parents=True, exist_ok=True)
            (sub / name).write_text("x")


def files(root: Path) -> set[str]:
    """Every file under `root` but the run lock (`RunLock` leaves its file behind by design)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != ".lock"}


def test_remove_guarded_run_removes_the_run_and_its_attempts_only(tmp_path):
    fake_run(tmp_path, attempts=2)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "attempts" / "attempt_1" / "keep.txt").write_text("mine")
    removed = remove_guarded_run(tmp_path)
    assert files(tmp_path) == {"notes.txt", "attempts/attempt_1/keep.txt"}
    assert "attempts/attempt_0/checkpoints/best.pt" in removed and "takeoff.json" in removed
    assert not (tmp_path / "attempts" / "attempt_0").exists()  # emptied folders go too
    assert remove_guarded_run(tmp_path) == []  # nothing left to remove


def test_train_overwrite_with_seeds_clears_each_seed_run(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "runs"
    for s in (0, 1, 5):
        fake_run(out / f"seed_{s}", attempts=1)
    # the manifest does not exist, so training fails after --overwrite has done its part
    code = main(
        ["train", "--config", str(cfg), "--manifest", str(tmp_path / "none.csv"), "--out", str(out),
         "--seeds", "0,1", "--overwrite", "--quiet"]
    )  # fmt: skip
    assert code != 0
    assert files(out / "seed_0") == set() and files(out / "seed_1") == set()
    assert "checkpoints/best.pt" in files(out / "seed_5")  # not among --seeds: untouched
    assert "removed the previous run's" in capsys.readouterr().out
