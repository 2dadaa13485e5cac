"""The run directory: one run at a time (a lock naming its holder), one run per directory (`--no-resume`
refuses a directory that holds another run), and which config changes a resumed run may take.

Nothing is written into a run directory before these checks pass: a refused run leaves it as it was.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Any

from ips.errors import RunDirError
from ips.format.lockfile import read_holder, write_holder

LOCK_FILE = ".lock"
# files a run writes: their presence means the directory holds a run
RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "metrics.csv",
    "curves.png",
    "checkpoints/last.pt",
    "checkpoints/best.pt",
    "takeoff.json",  # the take-off guard's record (ips.training.restarts)
)
# keys that change neither the model nor what it sees: a resumed run may change them
RESUMABLE_KEYS = frozenset(
    {
        "train.epochs",
        "train.device",
        "train.vram_budget_gb",
        "train.micro_batch_size",
        "train.early_stopping_patience",
        "train.takeoff_epoch",
        "train.takeoff_auroc",
        "train.restarts",
        "data.read_threads",
        "selection.prefetch",
    }
)


class RunLock:
    """An exclusive `fcntl` lock on `run_dir/.lock`, released when the process ends however it ends.

    The file holds the holder's PID, host and start time, so that a refused run can name it.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(fd)
            os.close(fd)
            raise RunDirError(
                f"{self.path.parent}: another run is using this run directory ({holder}); wait "
                "for it to end or use another --out"
            ) from None
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        write_holder(fd, f"PID {os.getpid()} on host {socket.gethostname()}, started {started}")
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holds_run(run_dir: Path) -> list[str]:
    """The run files present in `run_dir` (empty: a fresh or empty directory)."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def check_fresh(run_dir: Path) -> None:
    """`--no-resume`: refuse a directory that holds another run, rather than mix two runs' files."""
    found = holds_run(run_dir)
    if found:
        raise RunDirError(
            f"{run_dir}: holds a previous run ({', '.join(found)}); --no-resume starts a new run "
            "only in a new or empty directory: use another --out, or delete this one"
        )


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1}}` -> `{"train.lr": 1}` (lists, e.g. tasks, stay whole values)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(accepted, refused) changes between a checkpoint's config and this run's, as `key: old -> new`."""
    a, b = flatten(saved), flatten(new)
    accepted, refused = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
            (accepted if key in RESUMABLE_KEYS else refused).append(line)
    return accepted, refused


def check_resumable(run_dir: Path, saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The accepted changes; RunDirError naming every refused key (they change the model or its data)."""
    accepted, refused = config_changes(saved, new)
    if refused:
        raise RunDirError(
            f"{run_dir}: cannot resume with a changed {'; '.join(refused)} (these change the model or its "
            f"data; resumable: {', '.join(sorted(RESUMABLE_KEYS))}); use a new --out, or --no-resume in an "
            "empty directory"
        )
    return accepted
