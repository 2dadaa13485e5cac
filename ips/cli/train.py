"""`ips train --config CFG.yaml [--manifest CSV] [--out RUN_DIR] [key=value ...]`"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ips.cli._threads import add_threads, apply_threads
from ips.config import ConfigError, load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train under a fixed memory budget",
        description="Train an IPS model. Multi-GPU: torchrun --nproc_per_node N -m ips.cli train ...",
    )
    p.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    p.add_argument("--manifest", help="CSV slide_id,path,label[,split]; overrides data.manifest")
    p.add_argument("--out", default=None, help="run directory (default runs/<config name>)")
    p.add_argument(
        "--no-resume", action="store_true", help="start over even if the run directory has a checkpoint"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--seeds",
        metavar="S,S,...",
        help="one run per seed into OUT/seed_<s>/, then each metric's mean, sd and 95%% interval over the "
        "seeds (OUT/summary.json and a table)",
    )
    add_threads(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4")
    p.set_defaults(func=run, trailing_overrides="overrides")


def run(args: argparse.Namespace) -> int:
    # heavy imports here, not at module level: building the parser must stay fast (`ips --help`)
    import torch

    from ips.runtime import resolve_device
    from ips.training.distributed import cleanup, init_distributed
    from ips.training.restarts import train_with_restarts
    from ips.training.seeds import parse_seeds, run_seeds

    apply_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    manifest = args.manifest or cfg.data.manifest
    if not manifest:
        raise ConfigError("no manifest: give --manifest or data.manifest")
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    dist_info = init_distributed(resolve_device(cfg.train.device).type)
    common = {"manifest": manifest, "dist_info": dist_info, "resume": not args.no_resume}
    try:
        if seeds is not None:  # seed variance (ips.training.seeds)
            run_seeds(cfg, seeds, out=out, show_progress=not args.quiet, **common)
            return 0
        result = train_with_restarts(cfg, run_dir=out, show_progress=not args.quiet, **common)
    except torch.cuda.OutOfMemoryError as e:
        print(
            f"ips train: out of device memory ({str(e).splitlines()[0]}); set train.vram_budget_gb to plan "
            "the micro-batch, or lower selection.memory_size",
            file=sys.stderr,
        )
        return 1
    finally:
        cleanup(dist_info)
    if dist_info.is_main:
        print(f"run directory: {result.run_dir} (checkpoints/best.pt, metrics.csv, curves.png)")
    return 0
