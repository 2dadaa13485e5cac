"""The learning-rate schedule training and pretraining share: linear warm-up, then cosine decay to 0."""

from __future__ import annotations

import math
from functools import partial

import torch


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler that scales every group's learning rate by `warmup_cosine` (one step per optimiser
    step); its state is saved with the checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, warmup_steps=warmup_steps, total_steps=total_steps)
    )
