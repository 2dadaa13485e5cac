"""The run directory: one run at a time (a lock naming its holder), one run per directory (`resume=False`
refuses a directory that holds another run; the CLI's `--overwrite` first removes it), which config
changes a resumed run may take, and that a resumed run reads the same data (`check_same_data`).

Nothing is written into a run directory before these checks pass: a refused run leaves it as it was.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ips.errors import RunDirError, WriteError, os_error_line
from ips.format.lockfile import read_holder, write_holder

if TYPE_CHECKING:  # the data layer is only needed when a run's data are fingerprinted
    from ips.config import DataConfig
    from ips.data.manifest import SlideRecord

LOCK_FILE = ".lock"
DATA_FILE = "data.json"  # what the run trains on: one digest per slide's manifest row and store
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
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise RunDirError(f"--out {self.path.parent} exists and is not a directory") from None
        except OSError as e:
            raise WriteError(
                f"cannot create the run directory: {os_error_line(e, self.path.parent)}"
            ) from None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WriteError(f"cannot take the run lock: {os_error_line(e, self.path)}") from None
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
    """`resume=False`: refuse a directory that holds another run, rather than mix two runs' files."""
    found = holds_run(run_dir)
    if found:
        raise RunDirError(
            f"{run_dir}: holds a previous run ({', '.join(found)}); a new run starts only in a new or "
            "empty directory: use another --out, or --overwrite to remove that run first"
        )


def remove_run(run_dir: Path, names: Sequence[str] = (*RUN_FILES, DATA_FILE)) -> list[str]:
    """`--overwrite`: delete the files of the run in `run_dir` (hold its `RunLock`); the names removed.

    Only the files a run writes (`names`, relative to `run_dir`), never the rest of the folder."""
    removed = []
    for name in names:
        path = run_dir / name
        try:
            if path.is_file() or path.is_symlink():
                path.unlink()
                removed.append(name)
        except OSError as e:
            raise WriteError(
                f"--overwrite: cannot remove the previous run: {os_error_line(e, path)}"
            ) from None
    return removed


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
            f"data; resumable: {', '.join(sorted(RESUMABLE_KEYS))}); use a new --out, or --overwrite to start "
            "over here"
        )
    return accepted


# --- what a run reads: a resumed run must read the same slides, labels and stores -------------------------


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def _marker(location: str) -> bytes | None:
    """The store's completion marker as written (None when it cannot be read: the store's reader says why)."""
    from ips.format import location as loc
    from ips.format.names import COMPLETE_MARKER

    try:
        if loc.is_remote(location):
            return loc.get_bytes(loc.object_store(location), COMPLETE_MARKER)
        return (loc.local_path(location) / COMPLETE_MARKER).read_bytes()
    except Exception:  # noqa: BLE001 - unreadable here is reported by the store's own open
        return None


def store_digest(location: str, data: DataConfig) -> str | None:
    """A digest of what a run reads from a store: the checksums its marker records for the pyramid, the
    mask and the grid (and feature set) of `data`. Another grid or feature set added later by `ips prep`
    or `ips embed` leaves it unchanged; a store rebuilt from other pixels changes it."""
    raw = _marker(location)
    if raw is None:
        return None
    try:
        arrays = json.loads(raw)["arrays"]
    except (ValueError, KeyError, TypeError):
        arrays = None
    if not isinstance(arrays, dict):
        return hashlib.sha256(raw).hexdigest()[:16]  # a marker without checksums: its bytes stand for it

    def read(name: str) -> bool:
        if name.startswith("grids/"):
            return name.split("/")[1] == data.grid
        if name.startswith("features/"):
            return data.mode == "features" and name.split("/")[1] == data.features
        return True

    return _digest({k: v for k, v in arrays.items() if read(k)})


def data_record(records: Sequence[SlideRecord], data: DataConfig) -> dict[str, dict[str, str | None]]:
    """`{slide_id: {"row": digest of path, split, labels, annotation file, "store": store_digest}}`."""
    out = {}
    for r in records:
        row = {
            "path": r.path,
            "split": r.split,
            "labels": {k: list(v) if isinstance(v, tuple) else v for k, v in r.labels.items()},
            "annotation": r.annotation and _file_digest(r.annotation),
        }
        out[r.slide_id] = {"row": _digest(row), "store": store_digest(r.path, data)}
    return out


def _differences(saved: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]) -> list[str]:
    def some(ids: list[str]) -> str:
        return f"{len(ids)} ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''})"

    added = sorted(set(now) - set(saved))
    removed = sorted(set(saved) - set(now))
    both = sorted(set(now) & set(saved))
    rows = [s for s in both if now[s]["row"] != saved[s]["row"]]
    stores = [s for s in both if now[s]["store"] != saved[s]["store"]]
    parts = []
    if added:
        parts.append(f"slides added: {some(added)}")
    if removed:
        parts.append(f"slides removed: {some(removed)}")
    if rows:
        parts.append(f"manifest rows changed (path, split, labels or annotation): {some(rows)}")
    if stores:
        parts.append(f"stores changed: {some(stores)}")
    return parts


def check_same_data(
    run_dir: Path,
    records: Sequence[SlideRecord],
    data: DataConfig,
    *,
    resuming: bool,
    write: bool = True,
) -> None:
    """A resumed run reads what the run it resumes read; RunDirError naming what changed otherwise.

    Compares the slides (`records`: the run's train and val rows) with `run_dir/data.json`, then (with
    `write`, rank 0) records them there. A run resumed from a directory without the file (an older ips)
    is taken as it is and recorded from now on.
    """
    now = data_record(records, data)
    path = run_dir / DATA_FILE
    if resuming and path.is_file():
        try:
            saved = json.loads(path.read_text())["slides"]
        except (ValueError, KeyError, TypeError, OSError):
            raise RunDirError(
                f"{path}: damaged (not the record of the run's data); use --overwrite to start over here"
            ) from None
        changed = _differences(saved, now)
        if changed:
            raise RunDirError(
                f"{run_dir}: cannot resume on different data ({'; '.join(changed)}); use --overwrite to "
                "start over here on these data, or a new --out"
            )
    if write:
        try:
            tmp = path.with_name(f".{DATA_FILE}.tmp")
            tmp.write_text(json.dumps({"format": "ips-run-data-1", "slides": now}, indent=1))
            os.replace(tmp, path)
        except OSError as e:
            raise WriteError(os_error_line(e, path)) from None
