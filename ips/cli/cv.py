"""`ips cv --config CFG.yaml --manifest CSV --folds K [--out DIR] [--overwrite] [key=value ...]`"""

from __future__ import annotations

import argparse
from pathlib import Path

from ips.cli._common import add_overwrite
from ips.cli._threads import add_threads, apply_threads
from ips.config import ConfigError, load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cv",
        help="k-fold cross-validation: one run per fold, each metric's mean, sd and 95%% interval",
        description="Stratified k folds of the manifest's train and val slides (test slides stay test): "
        "fold f is the val split of run DIR/fold_<f>/run; DIR/summary.json and a table summarise the folds.",
    )
    p.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    p.add_argument("--manifest", help="CSV slide_id,path,label[,split]; overrides data.manifest")
    p.add_argument("--folds", type=int, required=True, help="number of folds (>= 2)")
    p.add_argument("--out", default=None, help="output directory (default runs/<config name>_cv)")
    add_overwrite(
        p,
        "remove the fold runs already in --out (DIR/fold_<f>/run) and start over instead of resuming them",
        old_name="--no-resume",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4")
    p.set_defaults(func=run, trailing_overrides="overrides")


def run(args: argparse.Namespace) -> int:
    from ips.runtime import resolve_device
    from ips.training.distributed import cleanup, init_distributed
    from ips.training.folds import run_folds
    from ips.training.restarts import remove_guarded_run
    from ips.training.rundir import RunLock

    apply_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    manifest = args.manifest or cfg.data.manifest
    if not manifest:
        raise ConfigError("no manifest: give --manifest or data.manifest")
    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).stem}_cv"
    dist_info = init_distributed(resolve_device(cfg.train.device).type)
    try:
        if args.overwrite and dist_info.is_main:
            for f in range(args.folds):
                run_dir = out / f"fold_{f}" / "run"
                with RunLock(run_dir):
                    removed = remove_guarded_run(run_dir)
                if removed:
                    print(f"--overwrite: removed the previous run's {', '.join(removed)} from {run_dir}")
        run_folds(
            cfg,
            args.folds,
            manifest=manifest,
            out=out,
            dist_info=dist_info,
            resume=not args.overwrite,
            show_progress=not args.quiet,
        )
    finally:
        cleanup(dist_info)
    return 0
