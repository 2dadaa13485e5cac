"""`ips heatmap --checkpoint CKPT STORE... --out DIR [--task NAME] [--top-k K] [--mode topm|all]`

Per store, under `DIR/<slide_id>/`: heatmap.png, scores.zarr, top_patches.png, and heatmap.geojson
(2D) or heatmap.nii.gz with three slice PNGs (3D); see `ips.infer.heatmap`. Exit 0: all done; 1: some stores
failed (the others are still drawn; a summary names each failure); 2: bad usage.
"""

from __future__ import annotations

import argparse

from ips.cli._inference_args import add_common, out_dir, report_failures
from ips.cli._threads import apply_threads
from ips.config import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "heatmap",
        help="attention heatmaps (PNG, QuPath GeoJSON, NIfTI, zarr scores)",
        description="Exact attention of every patch, drawn and exported per store under DIR/<slide_id>/.",
    )
    add_common(p)
    p.add_argument("stores", nargs="+", metavar="STORE", help="stores made by `ips prep`")
    p.add_argument("--task", help="draw only this task (default: every task, one panel each)")
    p.add_argument(
        "--top-k", type=int, default=16, help="patches in top_patches.png per task (0: none; default 16)"
    )
    p.add_argument(
        "--thumb-size",
        type=int,
        default=1024,
        help="longest side of the pyramid level the overlay is drawn on (default 1024)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ips.infer.loop import heatmap_slides, load, store_records

    if args.top_k < 0:
        raise ConfigError(f"--top-k must be >= 0, got {args.top_k}")
    if args.thumb_size < 16:
        raise ConfigError(f"--thumb-size must be >= 16, got {args.thumb_size}")
    records = store_records(args.stores)
    out = out_dir(args.out)  # before any work: a bad --out is bad usage
    apply_threads(args.threads)
    loaded = load(args.checkpoint, args.device)
    failures = heatmap_slides(
        loaded,
        records,
        out,
        task=args.task,
        top_k=args.top_k,
        mode=args.mode,
        thumb_size=args.thumb_size,
        checkpoint=str(args.checkpoint),
        log=print,
    )
    return report_failures("heatmap", failures)
