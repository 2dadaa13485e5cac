"""`ips train --config CFG.yaml [--manifest CSV] [--out RUN_DIR] [--device D] [--overwrite] [key=value ...]`"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ips.cli._common import add_device, add_overrides, add_overwrite, add_quiet
from ips.cli._threads import add_threads, apply_threads
from ips.config import ConfigError, load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train under a fixed memory budget",
        description="Train an IPS model; rerunning into the same --out resumes it (same config and data). "
        "Multi-GPU: torchrun --nproc_per_node N -m ips.cli train ...",
    )
    p.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    p.add_argument("--manifest", help="CSV slide_id,path,label[,split] (default data.manifest)")
    p.add_argument("--out", default=None, help="run directory (default runs/<config name>)")
    add_device(p, default=None, help="auto (CUDA if available), cpu, cuda, ... (default train.device)")
    add_overwrite(
        p,
        "remove the run already in --out (checkpoints, metrics, config, set-aside attempts; with --seeds each OUT/seed_<s>) and start over instead of resuming it",
        old_name="--no-resume",
    )
    add_quiet(p, "no progress bar")
    p.add_argument(
        "--seeds",
        metavar="S,S,...",
        help="one run per seed into OUT/seed_<s>/, then each metric's mean, sd and 95%% interval over the "
        "seeds (OUT/summary.json and a table)",
    )
    add_threads(p)
    add_overrides(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # heavy imports here, not at module level: building the parser must stay fast (`ips --help`)
    import torch

    from ips.runtime import resolve_device
    from ips.training.distributed import cleanup, init_distributed
    from ips.training.restarts import remove_guarded_run, train_with_restarts
    from ips.training.rundir import RunLock
    from ips.training.seeds import parse_seeds, run_seeds

    apply_threads(args.threads)
    overrides = [*args.overrides, *([f"train.device={args.device}"] if args.device else [])]
    cfg = load_config(args.config, overrides)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    manifest = args.manifest or cfg.data.manifest
    if not manifest:
        raise ConfigError("no manifest: give --manifest or data.manifest")
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    dist_info = init_distributed(resolve_device(cfg.train.device).type)
    common = {"manifest": manifest, "dist_info": dist_info, "resume": not args.overwrite}
    try:
        if args.overwrite and dist_info.is_main:
            # under the run lock: a run in progress there is never removed (then train() takes the lock
            # again; a run that starts in between makes train() refuse, as for any held directory)
            for run_dir in [out] if seeds is None else [out / f"seed_{s}" for s in seeds]:
                with RunLock(run_dir):
                    removed = remove_guarded_run(run_dir)
                if removed:
                    print(f"--overwrite: removed the previous run's {', '.join(removed)} from {run_dir}")
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
