"""The arguments `ips predict` and `ips heatmap` share, and how they report failures."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ips.cli._threads import add_threads
from ips.errors import ConfigError

if TYPE_CHECKING:  # torch is imported when a command runs, not when `ips --help` builds the parser
    from ips.errors import Failure


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by `ips train` (e.g. best.pt)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ... (default auto)"
    )
    p.add_argument(
        "--mode",
        choices=("topm", "all"),
        default="topm",
        help="prediction from the top-M selected patches as trained (default), or from all N "
        "patches by exact streaming attention (a model trained on top-M has never seen the rest: on "
        "mostly blank Megapixel MNIST canvases 'all' answered majority at 0.10 instead of 0.885)",
    )
    add_threads(p)


def out_dir(path: str) -> Path:
    """`--out` as a folder; ConfigError (exit 2) when it names an existing file."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    return out


def err(line: str) -> None:
    print(line, file=sys.stderr)


def report_failures(command: str, failures: Sequence[Failure]) -> int:
    """Name each failed store; the exit status (1 when any failed, else 0)."""
    if not failures:
        return 0
    err(f"ips {command}: {len(failures)} store(s) failed:")
    for f in failures:
        err(f"  {f.name} ({f.path}): {f.reason}")
    return 1
