"""`--threads`: the torch CPU thread count, one option with one meaning in every command that computes."""

from __future__ import annotations

import argparse
import os
import sys


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS says, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,  # a negative count is refused where it is applied (ConfigError, exit 2)
        default=None,
        metavar="N",
        help="torch CPU threads (0: torch's default, one per core; more than the cores available is "
        "lowered to that count; default half the cores, at most 4). On a shared or small machine 1 is "
        "often faster: threads wait on each other while other processes hold the cores",
    )


def bounded_threads(threads: int | None, *, cores: int | None = None) -> int | None:
    """`threads` lowered to the cores available, with a one-line warning when it was more: thousands of
    torch threads exhaust the process's stacks and crash it instead of running."""
    cores = cores or available_cores()
    if threads is not None and threads > cores:
        print(
            f"warning: --threads {threads} is more than the {cores} cores available; using {cores}",
            file=sys.stderr,
        )
        return cores
    return threads


def apply_threads(threads: int | None) -> int:
    """`bounded_threads`, then `ips.runtime.apply_threads` (imported late: building the parser must not
    import torch)."""
    from ips.runtime import apply_threads as apply

    return apply(bounded_threads(threads))
