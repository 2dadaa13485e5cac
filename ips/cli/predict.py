"""`ips predict --checkpoint CKPT (--manifest CSV | STORE...) --out DIR [--mode topm|all] [--device D]`

Writes `DIR/predictions.csv` (one row per slide and task; `ips.infer.predictions`) and, when labels are known,
`DIR/metrics.json`. Exit 0: every store predicted; 1: some failed (the others are still predicted and a
summary names each failure); 2: bad usage (no checkpoint, bad manifest, no inputs).
"""

from __future__ import annotations

import argparse
import time

from ips.cli._inference_args import add_common, err, out_dir, report_failures
from ips.cli._threads import apply_threads
from ips.config import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="predict slides with a trained checkpoint",
        description="Predict every slide of a manifest (or the given stores) with a trained checkpoint.",
    )
    add_common(p)
    p.add_argument("stores", nargs="*", metavar="STORE", help="stores made by `ips prep` (or use --manifest)")
    p.add_argument("--manifest", help="CSV slide_id,path[,label columns][,split]; labels give metrics.json")
    p.add_argument("--split", choices=("train", "val", "test"), help="only the manifest rows of this split")
    p.add_argument("--quiet", action="store_true", help="no per-slide lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ips.data.manifest import read_manifest
    from ips.infer.loop import load, predict_slides, store_records

    if bool(args.manifest) == bool(args.stores):
        raise ConfigError("give either --manifest CSV or one or more STORE paths (not both)")
    if args.split and not args.manifest:
        raise ConfigError("--split needs --manifest")
    out = out_dir(args.out)  # before any work: a bad --out is bad usage
    apply_threads(args.threads)
    loaded = load(args.checkpoint, args.device)
    if args.manifest:
        records = read_manifest(
            args.manifest, loaded.cfg.model.tasks, args.split, require_labels=False, check_paths=False
        )
    else:
        records = store_records(args.stores)
    if not records:
        raise ConfigError(f"no slides to predict (manifest {args.manifest}, split {args.split})")
    t0 = time.perf_counter()
    report = predict_slides(
        loaded, records, out, mode=args.mode, checkpoint=str(args.checkpoint), log=None if args.quiet else err
    )
    print(
        f"ips predict: {report.n_done} of {len(records)} slides predicted ({args.mode}) in "
        f"{time.perf_counter() - t0:.1f}s -> {report.predictions}"
    )
    if report.metrics_file:
        print(f"metrics -> {report.metrics_file}")
    return report_failures("predict", report.failures)
