"""Checkpoints: model, optimiser, scheduler, RNG states, resolved config and metrics in one file.

Loading uses `torch.load(weights_only=True)`: a checkpoint is data, never code.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ips.config import ExperimentConfig
from ips.errors import CheckpointError
from ips.model.coarse import attach_coarse_scorer
from ips.model.ips_model import IPSModel, build_model
from ips.model.torchfile import read_torch_file, save_torch_file


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    config: ExperimentConfig,
    epoch: int,
    metrics: dict[str, float],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write atomically (temp file + rename): an interrupted save never leaves a truncated checkpoint; a
    failed one (disk full, read-only folder) is a WriteError naming the file."""
    path = Path(path)
    payload = {
        "format": "ips-checkpoint-1",
        "model": model.state_dict(),
        "config": config.to_dict(),
        "epoch": epoch,
        "metrics": metrics,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        "extra": extra or {},
    }
    save_torch_file(payload, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's payload; CheckpointError naming the file when it is missing, a directory, empty,
    damaged or not an ips checkpoint."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a directory, not a checkpoint file (e.g. {path}/checkpoints/best.pt)"
        )
    payload = read_torch_file(path, what="checkpoint", map_location=map_location)
    if not isinstance(payload, dict) or payload.get("format") != "ips-checkpoint-1":
        raise CheckpointError(f"{path} is not an ips checkpoint (written by `ips train`)")
    return payload


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[IPSModel, ExperimentConfig]:
    """The model of a checkpoint, in eval mode, and its resolved config."""
    payload = load_checkpoint(path)
    try:
        config = ExperimentConfig.from_dict(payload["config"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: its config is not valid for this version of ips ({e})") from None
    # weights come from the checkpoint: never reach for a hub or a local pretrained file here
    model = build_model(_without_pretrained(config).model, views=config.data.views)
    if config.selection.cascade:  # the cascade's coarse scorer is saved with the model
        attach_coarse_scorer(model, width=config.selection.cascade_width)
    try:
        model.load_state_dict(payload["model"])
    except (KeyError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: its weights do not fit its config ({reason})") from None
    return model.to(device).eval(), config


def _without_pretrained(config: ExperimentConfig) -> ExperimentConfig:
    import dataclasses

    return dataclasses.replace(config, model=dataclasses.replace(config.model, pretrained=False))
