"""The arguments `ips predict` and `ips heatmap` share, and how they report failures."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ips.cli._common import add_device, add_quiet
from ips.cli._threads import add_threads
from ips.data.manifest import SPLITS
from ips.errors import ConfigError, Failure, WriteError, failure_summary, os_error_line


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by `ips train` (e.g. best.pt)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "stores",
        nargs="*",
        metavar="STORE|key=value",
        help="stores made by `ips prep` (or use --manifest); section.key=value items override the "
        "checkpoint's config where it does not fix the model, e.g. selection.iter_size=64",
    )
    p.add_argument("--manifest", help="CSV slide_id,path[,label columns][,split] (instead of STOREs)")
    p.add_argument("--split", choices=SPLITS, help="only the manifest rows of this split")
    add_device(p)
    p.add_argument(
        "--mode",
        choices=("topm", "all"),
        default="topm",
        help="prediction from the top-M selected patches as trained (default topm), or from all N "
        "patches by exact streaming attention (a model trained on top-M has never seen the rest; "
        'compared in docs/BENCHMARKS.md, "Top-M against whole-bag prediction")',
    )
    add_quiet(p, "no per-slide lines")
    add_threads(p)
    p.set_defaults(trailing_overrides="stores")


def out_dir(path: str) -> Path:
    """`--out` as a folder, made now: ConfigError (exit 2) when it names an existing file, WriteError
    (one line naming it) when it cannot be made (a file on its path, a read-only or unwritable folder)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"--out: {os_error_line(e, out)}") from None
    return out


def check_inputs(args: argparse.Namespace, stores: Sequence[str]) -> None:
    """Either --manifest or STOREs; --split only with --manifest (ConfigError, exit 2)."""
    if bool(args.manifest) == bool(stores):
        raise ConfigError("give either --manifest CSV or one or more STORE paths (not both)")
    if args.split and not args.manifest:
        raise ConfigError("--split needs --manifest")


def err(line: str) -> None:
    print(line, file=sys.stderr)


def report_failures(command: str, failures: Sequence[Any], total: int) -> int:
    """Name each failed store; the exit status (1 when any failed, else 0)."""
    as_failures = [
        f if isinstance(f, Failure) else Failure(getattr(f, "name", None) or f.slide_id, f.path, f.reason)
        for f in failures
    ]
    for line in failure_summary(command, as_failures, total):
        err(line)
    return 1 if failures else 0
