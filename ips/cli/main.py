"""The `ips` console script: one parser, one module per subcommand.

Each subcommand module exposes `register(subparsers)`, which adds its parser and sets `func`, a callable
taking the parsed namespace and returning the exit status (0 all done, 1 some inputs failed, 2 bad
usage or config; docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ips import __version__
from ips.errors import EXIT_SOME_FAILED, EXIT_USAGE, IpsError, os_error_line

# module paths of subcommands; each must have `register(subparsers)`
SUBCOMMANDS = [
    "data_prep.cli",
    "ips.cli.train",
    "ips.cli.cv",
    "ips.cli.pretrain",
    "ips.cli.predict",
    "ips.cli.heatmap",
    "ips.cli.embed",
    "ips.cli.bench",
    "ips.cli.verify",
    "ips.cli.demo",
    "ips.cli.view",
    "ips.cli.synth",
    "ips.cli.eval",
    "ips.cli.manifest",
    "ips.cli.suggest",
    "ips.cli.prune",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ips", description="Memory-bounded Iterative Patch Selection.")
    parser.add_argument("--version", action="version", version=f"ips {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        importlib.import_module(module).register(subparsers)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`argv` parsed; key=value items left after the options go to the subcommand's override list.

    argparse fills a positional list only once, so in `ips pretrain S... --config C --out D k=v` the
    trailing `k=v` would be "unrecognized"; a subcommand names the list that takes them with
    `set_defaults(trailing_overrides=FIELD)`. Anything else left over is an error, as before.
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        field = getattr(args, "trailing_overrides", None)
        if field is None or not all("=" in x and not x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, field, [*getattr(args, field), *extra])
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except IpsError as e:  # the one place errors become exit statuses (ips.errors)
        label = f"{e.label}: " if e.label else ""
        print(f"ips {args.command}: {label}{e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a file or folder that cannot be read or written: one line, not a traceback
        if e.errno is None:
            raise
        print(f"ips {args.command}: {os_error_line(e)}", file=sys.stderr)
        return EXIT_SOME_FAILED
    except Exception as e:  # an object store's client error (obstore): one short line, not its dump
        from ips.errors import is_remote_error, one_line

        if not is_remote_error(e):
            raise
        print(f"ips {args.command}: {one_line(e)}", file=sys.stderr)
        return EXIT_SOME_FAILED
    except KeyboardInterrupt:
        print(f"ips {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
