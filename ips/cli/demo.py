"""`ips demo [--out DIR] [--quick]`: synthetic slides -> train -> predict -> heatmaps, in minutes on a CPU."""

from __future__ import annotations

import argparse

from ips.cli._common import add_device, add_quiet
from ips.cli._threads import add_threads, apply_threads


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the whole pipeline on synthetic slides with planted lesions, in minutes on a CPU",
        description="Generate synthetic slides with planted lesions, train on them, predict the test slides "
        "and draw their attention heatmaps; check that the heatmaps find the lesions.",
    )
    p.add_argument(
        "--out",
        default="ips-demo",
        help="output folder (default ./ips-demo); a previous demo "
        "there is replaced, any other non-empty folder is refused",
    )
    p.add_argument("--quick", action="store_true", help="a smaller, shorter setting (a smoke test)")
    add_device(p)
    add_threads(p)
    add_quiet(p, "no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ips.demo import FULL, QUICK, run_demo, summary

    threads = apply_threads(args.threads)
    result = run_demo(
        args.out,
        QUICK if args.quick else FULL,
        device=args.device,
        threads=threads,
        show_progress=not args.quiet,
    )
    print(summary(result))
    return 0
