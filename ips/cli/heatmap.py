"""`ips heatmap --checkpoint CKPT (--manifest CSV | STORE...) --out DIR [--task NAME] [--top-k K] [--scale slide|global|cohort] [--threshold T] [key=value ...]`

Per store, under `DIR/<slide_id>/`: heatmap.png, scores.zarr, top_patches.png, and heatmap.geojson
(2D) or heatmap.nii.gz with three slice PNGs (3D); see `ips.infer.heatmap`. Colours show attention
relative to uniform (N * a, `ips.infer.scale`): `--scale slide` stretches each slide's PNG to its own
peak; `--scale global` draws every slide on the viewer's fixed scale (`ips view`'s global switch), and
`--scale cohort` on one scale for the slides given (the highest peak among them): either way a colour
means the same N * a on every PNG. `--threshold T`: nothing painted at or below T times uniform. Exit 0: all done; 1: some stores
failed (the others are still drawn; a summary names each failure); 2: bad usage.
"""

from __future__ import annotations

import argparse
import math

from ips.cli._common import split_overrides
from ips.cli._inference_args import add_common, check_inputs, out_dir, report_failures
from ips.cli._threads import apply_threads
from ips.config import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "heatmap",
        help="attention heatmaps (PNG, QuPath GeoJSON, NIfTI, zarr scores)",
        description="Exact attention of every patch, drawn and exported per store under DIR/<slide_id>/.",
    )
    add_common(p)
    p.add_argument("--task", help="draw only this task (default every task, one panel each)")
    p.add_argument(
        "--top-k", type=int, default=16, help="patches in top_patches.png per task (0: none; default 16)"
    )
    p.add_argument(
        "--thumb-size",
        type=int,
        default=1024,
        help="longest side of the pyramid level the overlay is drawn on (default 1024)",
    )
    p.add_argument(
        "--scale",
        choices=("slide", "global", "cohort"),
        default="slide",
        help="colour scale: each slide's own peak (slide, default); the viewer's fixed scale on every "
        "slide (global), or one scale for the slides given (cohort: their highest peak); with global or "
        "cohort the same colour means the same attention on every slide",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=1.0,
        help="paint nothing at or below this multiple of uniform attention N * a (default 1: uniform)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ips.config import override_loaded
    from ips.data.manifest import read_manifest, safe_slide_id
    from ips.infer.loop import heatmap_slides, load, store_records

    stores, overrides = split_overrides(args.stores)
    check_inputs(args, stores)
    if args.top_k < 0:
        raise ConfigError(f"--top-k must be >= 0, got {args.top_k}")
    if args.thumb_size < 16:
        raise ConfigError(f"--thumb-size must be >= 16, got {args.thumb_size}")
    if not (math.isfinite(args.threshold) and args.threshold > 0):
        raise ConfigError(f"--threshold must be a multiple of uniform attention > 0, got {args.threshold}")
    records = store_records(stores) if stores else []
    for (
        r
    ) in records:  # each becomes a folder DIR/<slide_id>: never '..' or a path (the manifest's are checked)
        safe_slide_id(r.slide_id, f"store {r.path}")
    out = out_dir(args.out)  # before any work: a bad --out is bad usage
    apply_threads(args.threads)
    loaded = load(args.checkpoint, args.device)
    loaded.cfg = override_loaded(loaded.cfg, overrides)
    if args.manifest:
        records = read_manifest(
            args.manifest, loaded.cfg.model.tasks, args.split, require_labels=False, check_paths=False
        )
        if not records:
            raise ConfigError(
                f"no slides in {args.manifest}" + (f" of split {args.split}" if args.split else "")
            )
    failures = heatmap_slides(
        loaded,
        records,
        out,
        task=args.task,
        top_k=args.top_k,
        mode=args.mode,
        thumb_size=args.thumb_size,
        checkpoint=str(args.checkpoint),
        log=None if args.quiet else print,
        scale=args.scale,
        threshold=math.log2(args.threshold),
    )
    return report_failures("heatmap", failures, len(records))
