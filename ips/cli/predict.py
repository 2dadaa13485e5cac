"""`ips predict --checkpoint CKPT (--manifest CSV | STORE...) --out DIR [--mode topm|all] [--device D]`

Writes `DIR/predictions.csv` (one row per slide and task; `ips.infer.predictions`) and, when labels are known,
`DIR/metrics.json`. Exit 0: every store predicted; 1: some failed (the others are still predicted and a
summary names each failure); 2: bad usage (no checkpoint, bad manifest, no inputs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ips.cli._inference_args import add_common, load, one_line, store_records
from ips.cli._threads import apply_threads
from ips.config import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="predict slides with a trained checkpoint",
        description="Predict every slide of a manifest (or the given stores) with a trained checkpoint.",
    )
    add_common(p)
    p.add_argument("stores", nargs="*", metavar="STORE", help="stores made by `ips prep` (or use --manifest)")
    p.add_argument("--manifest", help="CSV slide_id,path[,label columns][,split]; labels give metrics.json")
    p.add_argument("--split", choices=("train", "val", "test"), help="only the manifest rows of this split")
    p.add_argument("--quiet", action="store_true", help="no per-slide lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from functools import partial

    from ips.data.manifest import ManifestError, read_manifest
    from ips.data.open import make_source
    from ips.data.streaming import stream_chunks
    from ips.infer.predictions import (
        labelled_metrics,
        prediction_rows,
        write_metrics_json,
        write_predictions_csv,
    )
    from ips.infer.slide import check_model_fits, infer_slide

    if bool(args.manifest) == bool(args.stores):
        raise ConfigError("give either --manifest CSV or one or more STORE paths (not both)")
    if args.split and not args.manifest:
        raise ConfigError("--split needs --manifest")
    apply_threads(args.threads)
    loaded = load(args.checkpoint, args.device)
    cfg, tasks = loaded.cfg, loaded.cfg.model.tasks
    if args.manifest:
        try:
            records = read_manifest(args.manifest, tasks, args.split, require_labels=False, check_paths=False)
        except ManifestError as e:
            print(f"ips predict: {e}", file=sys.stderr)
            return 2
    else:
        records = store_records(args.stores)
    if not records:
        raise ConfigError(f"no slides to predict (manifest {args.manifest}, split {args.split})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stream = partial(stream_chunks, prefetch=cfg.selection.prefetch, pin_memory=loaded.device.type == "cuda")

    rows: list[dict[str, str]] = []
    logits: dict[str, list] = {t.name: [] for t in tasks}
    labels: dict[str, list] = {t.name: [] for t in tasks}
    failures: list[tuple[str, str, str]] = []
    t_start = time.perf_counter()
    for i, record in enumerate(records, 1):
        t0 = time.perf_counter()
        try:
            source = make_source(record, cfg)
            check_model_fits(source, cfg, f"store {record.path}")
            inf = infer_slide(loaded.model, source, memory_size=cfg.selection.memory_size,
                              iter_size=cfg.selection.iter_size, modes=(args.mode,), score=cfg.selection.score,
                              device=loaded.device, stream=stream, autocast_dtype=loaded.autocast_dtype)
        except Exception as e:  # noqa: BLE001 - one bad store must not stop the others
            failures.append((record.slide_id, record.path, one_line(e)))
            print(f"[{i}/{len(records)}] {record.slide_id}: FAILED: {one_line(e)}", file=sys.stderr)
            continue
        for task in tasks:
            value = inf.logits[args.mode][task.name]
            label = record.labels.get(task.name)
            rows.append(prediction_rows(task, record.slide_id, value, label))
            logits[task.name].append(value)
            labels[task.name].append(label)
        if not args.quiet:
            print(f"[{i}/{len(records)}] {record.slide_id}: {inf.n_patches} patches, "
                  f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)

    write_predictions_csv(out / "predictions.csv", tasks, rows)
    done = len(records) - len(failures)
    print(f"ips predict: {done} of {len(records)} slides predicted ({args.mode}) in "
          f"{time.perf_counter() - t_start:.1f}s -> {out / 'predictions.csv'}")
    metrics = labelled_metrics(tasks, logits, labels)
    if metrics:
        write_metrics_json(out / "metrics.json", metrics, {
            "mode": args.mode, "checkpoint": str(args.checkpoint), "n_slides": done,
            "failed": [sid for sid, _, _ in failures]})
        print(f"metrics -> {out / 'metrics.json'}")
    if failures:
        print(f"ips predict: {len(failures)} store(s) failed:", file=sys.stderr)
        for sid, path, reason in failures:
            print(f"  {sid} ({path}): {reason}", file=sys.stderr)
        return 1
    return 0
