"""Evaluation metrics per task: loss, accuracy, balanced accuracy, AUROC (binary and per class)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ips.config import TaskConfig
from ips.model.tasks import predictions, probabilities, task_loss


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve by the rank statistic (ties count 1/2); NaN when one class is absent."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def balanced_accuracy(pred: np.ndarray, target: np.ndarray, num_classes: int) -> float:
    recalls = [float((pred[target == c] == c).mean()) for c in range(num_classes) if (target == c).any()]
    return float(np.mean(recalls)) if recalls else float("nan")


def task_metrics(task: TaskConfig, logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Metrics of one task over a set of slides: logits `(S, n_out)`, target as in `ips.model.tasks`."""
    logits = logits.float()
    out = {"loss": float(task_loss(task, logits, target).mean())}
    pred = predictions(task, logits).numpy()
    prob = probabilities(task, logits).numpy()
    y = target.numpy()
    if task.kind == "multilabel":
        out["accuracy"] = float((pred == y).mean())  # per label
        out["exact_match"] = float((pred == y).all(axis=1).mean())
        per_class = [auroc(prob[:, c], y[:, c] > 0.5) for c in range(task.num_classes)]
    else:
        y = y.astype(np.int64)
        out["accuracy"] = float((pred == y).mean())
        out["balanced_accuracy"] = balanced_accuracy(pred, y, task.num_classes)
        if task.kind == "binary":
            out["auroc"] = auroc(prob, y == 1)
            return out
        per_class = [auroc(prob[:, c], y == c) for c in range(task.num_classes)]
    for c, value in enumerate(per_class):
        out[f"auroc_{c}"] = value
    valid = [v for v in per_class if not math.isnan(v)]
    out["auroc"] = float(np.mean(valid)) if valid else float("nan")
    return out


def evaluate_logits(
    tasks: Sequence[TaskConfig], logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Flat metrics `{task/metric: value}` plus `loss` (weighted sum of task losses)."""
    out: dict[str, float] = {}
    total = 0.0
    for task in tasks:
        metrics = task_metrics(task, logits[task.name], targets[task.name])
        total += task.weight * metrics["loss"]
        out.update({f"{task.name}/{k}": v for k, v in metrics.items()})
    out["loss"] = total
    return out
