"""Evaluation metrics per task: loss, accuracy, balanced accuracy, AUROC (binary and per class); MAE, R²,
Pearson for regression; Harrell's concordance index for survival (and, as a ranking score whose chance
level is 0.5 like AUROC's, for regression and ordinal tasks too)."""

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


def concordance_index(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Harrell's C: over the comparable pairs (slide i's event observed, at a time earlier than slide j's
    time, event or censoring), the share where i has the higher risk; equal risks count 1/2. Pairs with
    equal times are not comparable. NaN without a comparable pair. O(S^2) in row blocks of bounded memory.

    risk, time `(S,)` float; event `(S,)` 0/1."""
    risk, time = np.asarray(risk, dtype=np.float64), np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    concordant, comparable = 0.0, 0
    rows = np.flatnonzero(event)
    for start in range(0, len(rows), 1024):
        i = rows[start : start + 1024]
        pair = time[i, None] < time[None, :]  # (b, S): j outlived i
        comparable += int(pair.sum())
        concordant += float((pair & (risk[i, None] > risk[None, :])).sum())
        concordant += 0.5 * float((pair & (risk[i, None] == risk[None, :])).sum())
    return concordant / comparable if comparable else float("nan")


def regression_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """MAE, RMSE, R² (1 - residual / total sum of squares) and Pearson's r of `pred` against `target` (S,);
    R² and r are NaN where the targets (or predictions, for r) do not vary."""
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    err = pred - target
    total = float(((target - target.mean()) ** 2).sum())
    dp, dt = pred - pred.mean(), target - target.mean()
    denom = math.sqrt(float((dp**2).sum()) * float((dt**2).sum()))
    return {
        "mae": float(np.abs(err).mean()),
        "rmse": float(math.sqrt((err**2).mean())),
        "r2": 1.0 - float((err**2).sum()) / total if total > 0 else float("nan"),
        "pearson": float((dp * dt).sum()) / denom if denom > 0 else float("nan"),
    }


# the metric of each task kind that the take-off guard reads (chance level 0.5 for every one): AUROC
# (macro over classes where there are several), Harrell's C where the label is a number or a time
TAKEOFF_METRIC = {
    "binary": "auroc",
    "multiclass": "auroc",
    "multilabel": "auroc",
    "ordinal": "c_index",
    "regression": "c_index",
    "survival": "c_index",
}


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of `metric` (a name such as `val_<task>/mae`) is the better one."""
    return metric.endswith(("loss", "/mae", "/rmse"))


def task_metrics(task: TaskConfig, logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Metrics of one task over a set of slides: logits `(S, n_out)`, target as in `ips.model.tasks`."""
    logits = logits.float()
    out = {"loss": float(task_loss(task, logits, target).mean())}
    pred = predictions(task, logits).numpy()
    prob = probabilities(task, logits).numpy()
    y = target.numpy()
    if task.kind == "survival":
        out["c_index"] = concordance_index(pred, y[:, 0], y[:, 1])
        out["events"] = float(y[:, 1].sum())
        return out
    if task.kind == "regression":
        out.update(regression_metrics(pred, y))
        # a larger value ranks as a later "event": C over all pairs (no censoring) is Kendall-like
        out["c_index"] = concordance_index(-pred, y, np.ones(len(y)))
        return out
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
        if task.kind == "ordinal":
            expected = prob @ np.arange(task.num_classes)  # (S,) the expected class
            out["mae"] = float(np.abs(pred - y).mean())
            out["c_index"] = concordance_index(-expected, y.astype(np.float64), np.ones(len(y)))
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
