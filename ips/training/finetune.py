"""Fine-tuning from given weights (a pruned model): a training run that starts from them, not from a
fresh init. Same trainer, run directory, checkpoints and resume as `train`; the weights load only when
the run starts fresh (a resumed run continues from its own `last.pt`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ips.config import ExperimentConfig
from ips.runtime import DistInfo
from ips.training.loop import Trainer, TrainResult, make_runtime
from ips.training.rundir import RunLock


def finetune(
    cfg: ExperimentConfig,
    weights: dict[str, torch.Tensor],
    *,
    manifest: str | Path,
    run_dir: str | Path,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train per `cfg` on `manifest` into `run_dir`, starting from `weights` (a state_dict of the model
    `cfg.model` builds). Single process."""
    run_dir = Path(run_dir)
    lock = RunLock(run_dir).acquire()
    try:
        runtime = make_runtime(cfg.train, DistInfo())
        trainer = Trainer.create(
            cfg, manifest=manifest, run_dir=run_dir, runtime=runtime, resume=True, log=log
        )
        if trainer.progress.epoch == 0:
            trainer.model.load_state_dict(weights)
        return trainer.fit(show_progress=show_progress)
    finally:
        lock.release()
