"""`ips predict --checkpoint CKPT (--manifest CSV | STORE...) --out DIR [--mode topm|all] [key=value ...]`

Writes `DIR/predictions.csv` (one row per slide and task; `ips.infer.predictions`) and, when labels are known,
`DIR/metrics.json`. Exit 0: every store predicted; 1: some failed (the others are still predicted and a
summary names each failure); 2: bad usage (no checkpoint, bad manifest, no inputs).
"""

from __future__ import annotations

import argparse
import time

from ips.cli._common import split_overrides
from ips.cli._inference_args import add_common, check_inputs, err, out_dir, report_failures
from ips.cli._threads import apply_threads
from ips.config import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="predict slides with a trained checkpoint",
        description="Predict every slide of a manifest (or the given stores) with a trained checkpoint; "
        "labels in the manifest give DIR/metrics.json.",
    )
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ips.config import override_loaded
    from ips.data.manifest import read_manifest
    from ips.errors import WriteError, os_error_line
    from ips.infer.loop import load, predict_slides, store_records

    stores, overrides = split_overrides(args.stores)
    check_inputs(args, stores)
    out = out_dir(args.out)  # before any work: a bad --out is bad usage
    apply_threads(args.threads)
    loaded = load(args.checkpoint, args.device)
    loaded.cfg = override_loaded(loaded.cfg, overrides)
    if args.manifest:
        records = read_manifest(
            args.manifest, loaded.cfg.model.tasks, args.split, require_labels=False, check_paths=False
        )
    else:
        records = store_records(stores)
    if not records:
        raise ConfigError(f"no slides to predict (manifest {args.manifest}, split {args.split})")
    t0 = time.perf_counter()
    started = time.time()
    try:
        report = predict_slides(
            loaded,
            records,
            out,
            mode=args.mode,
            checkpoint=str(args.checkpoint),
            log=None if args.quiet else err,
        )
    except OSError as e:  # writing the results (a full disk, a read-only folder): name the file
        if e.errno is None or e.filename is not None:
            raise
        csv_file = out / "predictions.csv"
        written = csv_file.is_file() and csv_file.stat().st_mtime >= started
        raise WriteError(os_error_line(e, out / ("metrics.json" if written else "predictions.csv"))) from None
    print(
        f"ips predict: {report.n_done} of {len(records)} slides predicted ({args.mode}) in "
        f"{time.perf_counter() - t0:.1f}s -> {report.predictions}"
    )
    if report.metrics_file:
        print(f"metrics -> {report.metrics_file}")
    return report_failures("predict", report.failures, len(records))
