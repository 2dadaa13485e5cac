"""`--threads`: the torch CPU thread count, one option with one meaning in every command that computes."""

from __future__ import annotations

import argparse

HELP = ("torch CPU threads (0: torch's default, one per core). On a shared or small machine 1 is often "
        "faster: small ops gain little from more threads, and threads wait on each other while other "
        "processes hold the cores (docs/BENCHMARKS.md)")


def add_threads(p: argparse.ArgumentParser, default: int = 0) -> None:
    p.add_argument("--threads", type=int, default=default, help=f"{HELP} (default {default})")


def apply_threads(threads: int) -> None:
    """Set torch's intra-op threads; ConfigError (exit 2) for a negative count. 0 leaves torch's default."""
    if threads < 0:
        from ips.config import ConfigError

        raise ConfigError(f"--threads must be >= 0, got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)
