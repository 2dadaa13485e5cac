"""Inputs converted by a pool of worker processes: a worker that dies fails only the input it held.

A `ProcessPoolExecutor` whose child dies (a crash, the OOM killer, `kill`) is broken: every input not yet
finished gets `BrokenProcessPool`, including those never started and those on healthy workers. Here each
worker tells the parent which input it begins (a queue), so that after a break

- inputs that had not started go back to a fresh pool, as if nothing happened;
- inputs that were running (one of them in the dead worker, the others in workers the broken pool ended)
  are each retried once, alone in a one-worker pool: the one that killed its worker and kills it again
  fails with one line; the others (and one whose worker was killed from outside) are converted.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from ips.errors import one_line

R = TypeVar("R")

DIED = "the worker process died while converting it (crash, out of memory or killed)"

_started: Any = None  # in a worker: the queue on which it names the input it begins


def die_with_parent(parent: int) -> None:
    """In a worker: exit as soon as the parent process `parent` dies (even by `kill -9`), so no orphan
    keeps converting (and holding a store's lock) after the run is gone.

    Linux: the kernel sends SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG). Everywhere: a daemon
    thread checks once a second that the parent is still ours (an orphan is re-parented)."""
    import ctypes
    import signal
    import threading
    import time

    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="ips-prep-parent-watch", daemon=True).start()


def _init(parent: int, started: Any) -> None:
    global _started
    _started = started
    die_with_parent(parent)


def _run_one(work: Callable[[str], R], item: str) -> R:
    _started.put(item)
    return work(item)


def _drain(started: Any, into: set[str]) -> None:
    while True:
        try:
            into.add(started.get_nowait())
        except queue_module.Empty:
            return


def _round(
    items: Sequence[str],
    work: Callable[[str], R],
    workers: int,
    report: Callable[[R], None],
    failed: Callable[[str, str], R],
    ctx: Any,
) -> tuple[list[str], list[str]]:
    """One pool over `items`; (not started, started but unfinished) when the pool broke, else ([], [])."""
    started_q = ctx.Queue()
    started: set[str] = set()
    unfinished: list[str] = []
    with ProcessPoolExecutor(
        max_workers=min(workers, len(items)),
        mp_context=ctx,
        initializer=_init,
        initargs=(os.getpid(), started_q),
    ) as pool:
        futures = {pool.submit(_run_one, work, item): item for item in items}
        for fut in as_completed(futures):
            try:
                result = fut.result()
            except BrokenProcessPool:
                unfinished.append(futures[fut])
                continue
            except Exception as e:  # noqa: BLE001 - what `work` raised for this input: its failure alone
                result = failed(futures[fut], one_line(e))
            report(result)
    # the queue's feeder may lag a dying worker by a moment; what it never sent counts as not started
    _drain(started_q, started)
    started_q.close()
    unfinished.sort(key=list(items).index)
    return [i for i in unfinished if i not in started], [i for i in unfinished if i in started]


def run_pool(
    items: Sequence[str],
    work: Callable[[str], R],
    *,
    workers: int,
    report: Callable[[R], None],
    failed: Callable[[str, str], R],
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> None:
    """`report(work(item))` for every item, `workers` processes at once (spawned: the parent may hold
    threads, which fork would copy in a broken state). `work` must be picklable (module-level).

    An item for which `work` raised is reported as `failed(item, one-line reason)`; one whose worker
    died, and died again when it was retried alone, as `failed(item, DIED)`.
    """
    ctx = multiprocessing.get_context("spawn")
    pending = list(items)
    while pending:
        not_started, suspects = _round(pending, work, workers, report, failed, ctx)
        if not suspects and len(not_started) == len(pending):  # workers die before any input: stop
            for item in not_started:
                report(failed(item, DIED))
            return
        for item in suspects:
            log(f"ips prep: a worker process died while {item} was converting; retrying it alone")
            again, crashed = _round([item], work, 1, report, failed, ctx)
            if crashed or again:
                report(failed(item, DIED))
        pending = not_started
