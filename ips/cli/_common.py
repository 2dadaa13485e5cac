"""Options every command that runs a model or reads a config shares, spelled the same everywhere.

- `key=value ...`: config overrides (positional, after or among the options);
- `--device`: where the model runs (`auto`: CUDA when available);
- `--quiet`: no progress bars or per-input lines;
- `--overwrite`: redo what a previous run left at `--out` (a store, a feature set, a run, a pretraining)
  instead of resuming or skipping it. Without it every command continues where an interrupted run
  stopped and keeps what is complete: the one redo flag, one meaning.
"""

from __future__ import annotations

import argparse
import re

# `section.key=value`: what tells an override from a store path in one positional list
OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*=")

DEVICE_HELP = "auto (CUDA if available), cpu, cuda, cuda:1, ... (default auto)"


def add_device(p: argparse.ArgumentParser, default: str | None = "auto", help: str = DEVICE_HELP) -> None:
    p.add_argument("--device", default=default, help=help)


def add_quiet(p: argparse.ArgumentParser, help: str = "no progress bars or per-input lines") -> None:
    p.add_argument("--quiet", action="store_true", help=help)


def add_overwrite(p: argparse.ArgumentParser, help: str, *, old_name: str | None = None) -> None:
    """`--overwrite`; `old_name` (e.g. `--no-resume`) stays accepted, hidden from the help."""
    p.add_argument("--overwrite", action="store_true", help=help)
    if old_name:
        p.add_argument(old_name, dest="overwrite", action="store_true", help=argparse.SUPPRESS)


def add_overrides(p: argparse.ArgumentParser, example: str = "train.lr=1e-4") -> None:
    """`key=value ...` config overrides; also taken after the options (`ips.cli.main.parse`)."""
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {example}")
    p.set_defaults(trailing_overrides="overrides")


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """(inputs, overrides) of one positional list: `section.key=value` items are overrides (argparse
    fills one positional list only, so `STORE... key=value...` arrives as one)."""
    overrides = [x for x in items if OVERRIDE.match(x)]
    return [x for x in items if not OVERRIDE.match(x)], overrides
