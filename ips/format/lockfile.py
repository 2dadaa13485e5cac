"""Who holds a lock file: the one-line record that the `ips prep` store lock (`.<id>.zarr.lock`) and the
`ips train` run-directory lock (`.lock`) keep, so that a refused process can name the holder."""

from __future__ import annotations

import os
import time


def write_holder(fd: int, text: str) -> None:
    """Replace the lock file's record with `text` (call right after taking the lock)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)


def read_holder(fd: int, wait: float = 1.0) -> str:
    """The holder's record. It is written just after the lock is taken, so an empty file is read again
    for up to `wait` seconds before the holder counts as unknown."""
    deadline = time.monotonic() + wait
    while True:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if text or time.monotonic() > deadline:
            return text or "holder unknown"
        time.sleep(0.02)
