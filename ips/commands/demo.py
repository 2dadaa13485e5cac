"""`ips demo [--out DIR] [--quick]`: synthetic slides -> train -> predict -> heatmaps, in minutes on a CPU."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="the whole pipeline on synthetic slides with planted lesions, in minutes on a CPU",
        description="Generate synthetic slides with planted lesions, train on them, predict the test slides "
                    "and draw their attention heatmaps; check that the heatmaps find the lesions.",
    )
    p.add_argument("--out", default="ips-demo", help="output folder (default ./ips-demo); a previous demo "
                   "there is replaced, any other non-empty folder is refused")
    p.add_argument("--quick", action="store_true", help="a smaller, shorter setting (a smoke test)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the demo's small ops gain little from more, and on a "
                        "busy machine more threads wait on each other; 0 = torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ips.demo import FULL, QUICK, run_demo, summary

    if args.threads < 0:
        from ips.config import ConfigError

        raise ConfigError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_demo(args.out, QUICK if args.quick else FULL, device=args.device, show_progress=not args.quiet)
    print(summary(result))
    return 0
