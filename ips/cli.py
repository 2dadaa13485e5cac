"""The `ips` console script: one parser, one module per subcommand.

Each subcommand module exposes `register(subparsers)`, which adds its parser and sets `func`, a callable
taking the parsed namespace and returning the exit status (0 all done, 1 some inputs failed, 2 bad
usage or config; DESIGN.md).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ips import __version__
from ips.config import ConfigError

# module paths of subcommands; each must have `register(subparsers)`
SUBCOMMANDS = [
    "data_prep.cli",
    "ips.commands.train",
    "ips.commands.pretrain",
    "ips.commands.predict",
    "ips.commands.heatmap",
    "ips.commands.embed",
    "ips.commands.bench",
    "ips.commands.demo",
]

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ips", description="Memory-bounded Iterative Patch Selection.")
    parser.add_argument("--version", action="version", version=f"ips {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"ips {args.command}: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"ips {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
