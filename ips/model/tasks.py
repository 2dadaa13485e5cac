"""Task heads and losses. Heads return logits; losses are computed on logits.

Label tensors per task, for a batch of B slides:
- binary: `(B,)` long in {0, 1}; multiclass: `(B,)` long in [0, C); multilabel: `(B, C)` float multi-hot.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ips.config import TaskConfig

Label = int | tuple[int, ...]


class TaskHeads(nn.Module):
    """One linear head per task, each reading its own query's embedding: `z (B, T, D)` -> {task: (B, n_out)}."""

    def __init__(self, tasks: Sequence[TaskConfig], d_model: int) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.heads = nn.ModuleDict({t.name: nn.Linear(d_model, t.n_outputs) for t in self.tasks})

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t.name: self.heads[t.name](z[:, i]) for i, t in enumerate(self.tasks)}


def task_loss(task: TaskConfig, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-slide loss `(B,)` from logits `(B, n_out)` and the task's label tensor."""
    if task.kind == "binary":
        return F.binary_cross_entropy_with_logits(logits[:, 0], target.to(logits.dtype), reduction="none")
    if task.kind == "multiclass":
        return F.cross_entropy(logits, target.long(), reduction="none")
    if task.kind == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none").mean(
            dim=1
        )
    raise ValueError(f"unknown task kind {task.kind!r}")


def total_loss(
    tasks: Sequence[TaskConfig], logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Weighted sum over tasks of per-slide losses: `(B,)`."""
    return sum(t.weight * task_loss(t, _at_least_fp32(logits[t.name]), targets[t.name]) for t in tasks)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # losses in fp32 even under bf16 autocast; keep fp64 where the model runs in fp64 (tests)
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def probabilities(task: TaskConfig, logits: torch.Tensor) -> torch.Tensor:
    """`(B, n_out)` logits -> probabilities: P(positive) `(B,)` for binary, class/label probabilities else."""
    if task.kind == "binary":
        return torch.sigmoid(logits[:, 0])
    if task.kind == "multiclass":
        return logits.softmax(dim=-1)
    return torch.sigmoid(logits)


def predictions(task: TaskConfig, logits: torch.Tensor) -> torch.Tensor:
    """Hard predictions: `(B,)` class for binary/multiclass, `(B, C)` 0/1 for multilabel."""
    if task.kind == "binary":
        return (logits[:, 0] > 0).long()
    if task.kind == "multiclass":
        return logits.argmax(dim=-1)
    return (logits > 0).long()


def label_tensor(task: TaskConfig, labels: Sequence[Label]) -> torch.Tensor:
    """Stack B labels of one task into its label tensor (see module docstring)."""
    if task.kind == "multilabel":
        out = torch.zeros(len(labels), task.num_classes)
        for i, lab in enumerate(labels):
            idx = list(lab) if isinstance(lab, (tuple, list)) else [lab]
            if idx:
                out[i, idx] = 1.0
        return out
    return torch.tensor([int(lab) for lab in labels], dtype=torch.long)
