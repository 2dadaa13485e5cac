"""`--threads`: the torch CPU thread count, one option with one meaning in every command that computes."""

from __future__ import annotations

import argparse


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (0: torch's default, one per core; default: half the cores, at most 4). "
        "On a shared or small machine 1 is often faster: threads wait on each other while other processes "
        "hold the cores (docs/BENCHMARKS.md)",
    )


def apply_threads(threads: int | None) -> int:
    """See `ips.runtime.apply_threads` (imported late: building the parser must not import torch)."""
    from ips.runtime import apply_threads as apply

    return apply(threads)
