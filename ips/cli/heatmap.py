"""`ips heatmap --checkpoint CKPT STORE... --out DIR [--task NAME] [--top-k K] [--mode topm|all]`

Per store, under `DIR/<slide_id>/`: heatmap.png, scores.zarr, top_patches.png, and heatmap.geojson
(2D) or heatmap.nii.gz with three slice PNGs (3D); see `ips.infer.heatmap`. Exit 0: all done; 1: some stores
failed (the others are still drawn; a summary names each failure); 2: bad usage.
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
        "heatmap", help="attention heatmaps (PNG, QuPath GeoJSON, NIfTI, zarr scores)",
        description="Exact attention of every patch, drawn and exported per store under DIR/<slide_id>/.",
    )
    add_common(p)
    p.add_argument("stores", nargs="+", metavar="STORE", help="stores made by `ips prep`")
    p.add_argument("--task", help="draw only this task (default: every task, one panel each)")
    p.add_argument("--top-k", type=int, default=16, help="patches in top_patches.png per task (0: none)")
    p.add_argument("--thumb-size", type=int, default=1024,
                   help="longest side of the pyramid level the overlay is drawn on")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ips.infer.heatmap import select_tasks, write_slide_heatmaps

    if args.top_k < 0:
        raise ConfigError(f"--top-k must be >= 0, got {args.top_k}")
    if args.thumb_size < 16:
        raise ConfigError(f"--thumb-size must be >= 16, got {args.thumb_size}")
    records = store_records(args.stores)
    apply_threads(args.threads)
    loaded = load(args.checkpoint, args.device)
    select_tasks(loaded.cfg.model.tasks, args.task)  # an unknown task is bad usage, before any work
    out = Path(args.out)
    failures: list[tuple[str, str, str]] = []
    for i, record in enumerate(records, 1):
        t0 = time.perf_counter()
        try:
            result = write_slide_heatmaps(
                loaded.model, loaded.cfg, record, out / record.slide_id, task=args.task, top_k=args.top_k,
                mode=args.mode, device=loaded.device, autocast_dtype=loaded.autocast_dtype,
                thumb_size=args.thumb_size, checkpoint=str(args.checkpoint))
        except Exception as e:  # noqa: BLE001 - one bad store must not stop the others
            failures.append((record.slide_id, record.path, one_line(e)))
            print(f"[{i}/{len(records)}] {record.slide_id}: FAILED: {one_line(e)}", file=sys.stderr)
            continue
        print(f"[{i}/{len(records)}] {record.slide_id}: {result.n_patches} patches, "
              f"{time.perf_counter() - t0:.1f}s -> {result.out_dir}")
    if failures:
        print(f"ips heatmap: {len(failures)} store(s) failed:", file=sys.stderr)
        for sid, path, reason in failures:
            print(f"  {sid} ({path}): {reason}", file=sys.stderr)
        return 1
    return 0
