"""Files written with `torch.save`: read as data only, written atomically, every failure one line.

`read_torch_file` refuses (CheckpointError naming the file) what is missing, a folder, empty, damaged,
or holds anything but tensors and plain data: `torch.load(weights_only=True)`, never code. Its message
does not repeat torch's advice to retry with `weights_only=False`: for a file of unknown origin that
would run whatever it holds.

`save_torch_file` writes a temporary file beside the target and renames it: an interrupted or failed
save never leaves a truncated file under the target's name. A full disk or a read-only folder is a
`WriteError` naming the file and what happened, not torch's `inline_container.cc ... unexpected pos`.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ips.errors import CheckpointError, WriteError, os_error_reason


def _reason(e: BaseException) -> str:
    """Why torch could not read a file, in one line and without its `weights_only=False` advice."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError):
        found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|Check the documentation|$)", text, re.S)
        detail = found.group(1).splitlines()[0] if found else "not plain data"
        return f"refused by the data-only loader ({detail}): damaged, or holding code, which ips never runs"
    if isinstance(e, EOFError):
        return "it ends too early (cut short)"
    if isinstance(e, OSError) and e.errno is not None:
        return os_error_reason(e)
    first = (text.strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def read_torch_file(
    path: str | Path,
    *,
    what: str = "checkpoint",
    keys: Iterable[str] = (),
    map_location: str | torch.device = "cpu",
) -> Any:
    """The object `torch.save` wrote at `path`, loaded as data only.

    `what` names the kind of file in messages; `keys`: the object must be a dict holding each of them.
    CheckpointError (one line naming the file) when the file is missing, a folder, empty, unreadable,
    damaged, refused by the data-only loader, or lacks a key.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a {what} file")
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the file was cut short; use another {what}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file
        raise CheckpointError(f"{path} cannot be read as a {what} ({_reason(e)})") from None
    want = list(keys)
    if want:
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path} is not a {what} (it holds a {type(obj).__name__}, not a dict)")
        missing = [k for k in want if k not in obj]
        if missing:
            raise CheckpointError(f"{path} is not a {what} (no {missing[0]!r} entry)")
    return obj


def _write_failure(path: Path, e: BaseException) -> WriteError:
    if isinstance(e, OSError) and e.errno is not None:
        return WriteError(f"{path}: cannot write ({os_error_reason(e)})")
    # torch reports a failed write from its C++ zip writer as RuntimeError ("unexpected pos", "file write
    # failed") without errno: say what the disk has left, the usual cause
    try:
        free = shutil.disk_usage(path.parent).free
        where = f"{free / 2**20:.0f} MiB free on its disk"
    except OSError:
        where = "its disk could not be inspected"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return WriteError(
        f"{path}: cannot write (the write failed: disk full or file system error; {where}; {first})"
    )


def save_torch_file(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)` through a temporary file and a rename; WriteError naming `path` when the
    write fails (the temporary file is removed, an earlier file at `path` stays as it was)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise _write_failure(path, e) from None
