"""Task heads and losses. Heads return logits; losses are computed on logits.

Label tensors per task, for a batch of B slides:
- binary: `(B,)` long in {0, 1}; multiclass and ordinal: `(B,)` long in [0, C); multilabel: `(B, C)`
  float multi-hot; regression: `(B,)` float; survival: `(B, 2)` float, columns (time, event in {0, 1}).

Outputs (`probabilities`): P(positive) for binary, class probabilities for multiclass and ordinal, label
probabilities for multilabel, the value for regression, the risk score for survival (higher means an
earlier event): the log hazard ratio (Cox), or minus the expected number of time bins survived
(`loss: discrete`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ips.config import ConfigError, TaskConfig

Label = int | float | tuple[int, ...] | tuple[float, int]


class TaskHeads(nn.Module):
    """One linear head per task, each reading its own query's embedding: `z (B, T, D)` -> {task: (B, n_out)}."""

    def __init__(self, tasks: Sequence[TaskConfig], d_model: int) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.heads = nn.ModuleDict({t.name: nn.Linear(d_model, t.n_outputs) for t in self.tasks})

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t.name: self.heads[t.name](z[:, i]) for i, t in enumerate(self.tasks)}


def task_loss(task: TaskConfig, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-slide loss `(B,)` from logits `(B, n_out)` and the task's label tensor.

    Survival: slide i's term of the Cox partial likelihood over these B slides (zero when censored), so
    the mean over slides is the batch's negative log partial likelihood divided by B; with `loss:
    discrete`, slide i's own negative log-likelihood under the per-bin hazards (`discrete_time_terms`)."""
    if task.kind == "binary":
        return F.binary_cross_entropy_with_logits(logits[:, 0], target.to(logits.dtype), reduction="none")
    if task.kind == "multiclass":
        return F.cross_entropy(logits, target.long(), reduction="none")
    if task.kind == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none").mean(
            dim=1
        )
    if task.kind == "ordinal":
        return F.binary_cross_entropy_with_logits(
            logits, cumulative_targets(target, task.num_classes).to(logits.dtype), reduction="none"
        ).mean(dim=1)
    if task.kind == "regression":
        y = target.to(logits.dtype)
        if task.loss == "huber":
            return F.huber_loss(logits[:, 0], y, reduction="none", delta=1.0)
        return F.mse_loss(logits[:, 0], y, reduction="none")
    if task.kind == "survival" and task.loss == "discrete":
        if task.time_bins is None:
            raise ValueError(f"task {task.name!r}: loss discrete without time_bins (set by `with_time_bins`)")
        edges = torch.tensor(task.time_bins, dtype=logits.dtype, device=logits.device)
        return discrete_time_terms(logits, time_bin(target[:, 0].to(logits.dtype), edges), target[:, 1] > 0.5)
    if task.kind == "survival":
        return cox_terms(logits[:, 0], target[:, 0].to(logits.dtype), target[:, 1] > 0.5)
    raise ValueError(f"unknown task kind {task.kind!r}")


def cumulative_targets(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Ordinal labels `(B,)` -> `(B, C-1)` 0/1: column k is whether the label exceeds k."""
    ks = torch.arange(num_classes - 1, device=target.device)
    return (target.long()[:, None] > ks[None, :]).long()


def cox_terms(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Per-slide terms `(B,)` of the negative Cox log partial likelihood, Breslow's handling of ties:
    `event_i * (log sum_{j: time_j >= time_i} exp(risk_j) - risk_i)`.

    risk `(B,)` (log hazard ratio), time `(B,)`, event `(B,)` bool. O(B log B): the risk set of slide i
    is a prefix of the slides sorted by time, longest first, so its log-sum-exp is a running one."""
    order = torch.argsort(time, descending=True, stable=True)
    running = torch.logcumsumexp(risk[order], dim=0)  # (B,) over the i longest times
    ascending = time[order].flip(0).contiguous()
    # size of slide i's risk set: the slides with time >= time_i (ties included: Breslow)
    at_risk = len(time) - torch.searchsorted(ascending, time.contiguous(), right=False)
    log_denominator = running[at_risk - 1]
    return torch.where(event, log_denominator - risk, torch.zeros_like(risk))


def time_bin(time: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """The bin `(B,)` long of each time: bin j holds `edges[j-1] <= time < edges[j]` (bin 0 everything
    below `edges[0]`, the last bin everything from `edges[-1]` on)."""
    return torch.bucketize(time.contiguous(), edges, right=True)


def discrete_time_terms(logits: torch.Tensor, bins: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Per-slide negative log-likelihood `(B,)` of a discrete-time survival model.

    logits `(B, K)`: the hazard of bin k is `h_k = sigmoid(logit_k)`, the chance of the event in bin k
    having survived the bins before it. bins `(B,)` long: the bin j of the slide's time; event `(B,)`
    bool. An event in bin j: `-log h_j - sum_{k<j} log(1 - h_k)`; censored in bin j (survived it):
    `-sum_{k<=j} log(1 - h_k)`. Each slide's term is its own (no risk set over the batch)."""
    k = torch.arange(logits.shape[1], device=logits.device)
    log_h, log_s = F.logsigmoid(logits), F.logsigmoid(-logits)  # log h_k, log (1 - h_k)
    before = k[None, :] < bins[:, None]
    at = k[None, :] == bins[:, None]
    survived = (log_s * before).sum(dim=1)
    last = torch.where(event, (log_h * at).sum(dim=1), (log_s * at).sum(dim=1))
    return -(survived + last)


def discrete_time_risk(logits: torch.Tensor) -> torch.Tensor:
    """Risk score `(B,)` of per-bin hazard logits `(B, K)`: minus the expected number of bins survived,
    `-sum_k S_k` with `S_k = prod_{j<=k} (1 - h_j)` (higher: an earlier event)."""
    return -torch.exp(torch.cumsum(F.logsigmoid(-logits), dim=1)).sum(dim=1)


def event_time_quantiles(times: Sequence[float], events: Sequence[bool], num_bins: int) -> tuple[float, ...]:
    """The `num_bins - 1` cut points that split the event times into bins of equal count (the quantiles
    1/K .. (K-1)/K of the times with an event; of every time when there are fewer events than bins).
    ValueError when they are not increasing (too few distinct times)."""
    import numpy as np

    chosen = [t for t, e in zip(times, events) if e]
    if len(chosen) < num_bins:
        chosen = list(times)
    if not chosen:
        raise ValueError("no survival times to cut into bins")
    cuts = np.quantile(np.asarray(chosen, dtype=np.float64), np.arange(1, num_bins) / num_bins)
    if np.any(np.diff(cuts) <= 0):
        raise ValueError(f"{len(set(chosen))} distinct times cannot be cut into {num_bins} bins")
    return tuple(float(c) for c in cuts)


def with_time_bins(tasks: Sequence[TaskConfig], records: Sequence) -> tuple[TaskConfig, ...]:
    """`tasks`, each survival task with `loss: discrete` and no `time_bins` given its cut points from
    the labels `(time, event)` of `records` (the training slides: objects with `.labels`)."""
    import dataclasses

    out = []
    for t in tasks:
        if t.kind == "survival" and t.loss == "discrete" and t.time_bins is None:
            labels = [r.labels[t.name] for r in records if t.name in r.labels]
            try:
                cuts = event_time_quantiles(
                    [a for a, _ in labels], [e > 0.5 for _, e in labels], t.num_classes
                )
            except ValueError as e:
                raise ConfigError(
                    f"model.tasks[{t.name}].num_classes: {e} from the training slides"
                ) from None
            t = dataclasses.replace(t, time_bins=cuts)
        out.append(t)
    return tuple(out)


def total_loss(
    tasks: Sequence[TaskConfig], logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Weighted sum over tasks of per-slide losses: `(B,)`."""
    return sum(t.weight * task_loss(t, _at_least_fp32(logits[t.name]), targets[t.name]) for t in tasks)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # losses in fp32 even under bf16 autocast; keep fp64 where the model runs in fp64 (tests)
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def probabilities(task: TaskConfig, logits: torch.Tensor) -> torch.Tensor:
    """`(B, n_out)` logits -> outputs (module docstring): `(B,)` for binary, regression and survival,
    `(B, C)` else. Ordinal: P(label > k) made non-increasing in k, then differenced into classes."""
    if task.kind == "binary":
        return torch.sigmoid(logits[:, 0])
    if task.kind == "multiclass":
        return logits.softmax(dim=-1)
    if task.kind == "survival" and task.loss == "discrete":
        return discrete_time_risk(logits)
    if task.kind in ("regression", "survival"):
        return logits[:, 0]
    if task.kind == "ordinal":
        exceed = torch.cummin(torch.sigmoid(logits), dim=-1).values  # (B, C-1)
        ones = torch.ones_like(exceed[:, :1])
        upper = torch.cat([ones, exceed], dim=-1)  # P(label >= k), k = 0..C-1
        lower = torch.cat([exceed, torch.zeros_like(ones)], dim=-1)  # P(label >= k+1)
        return upper - lower
    return torch.sigmoid(logits)


def predictions(task: TaskConfig, logits: torch.Tensor) -> torch.Tensor:
    """Hard predictions: `(B,)` class for binary/multiclass/ordinal, `(B, C)` 0/1 for multilabel, the
    value `(B,)` for regression and the risk score `(B,)` for survival."""
    if task.kind == "binary":
        return (logits[:, 0] > 0).long()
    if task.kind == "multiclass":
        return logits.argmax(dim=-1)
    if task.kind == "survival" and task.loss == "discrete":
        return discrete_time_risk(logits)
    if task.kind in ("regression", "survival"):
        return logits[:, 0]
    if task.kind == "ordinal":
        # the largest k with P(label >= k) > 1/2 (the cumulative probabilities made non-increasing)
        return (torch.cummin(torch.sigmoid(logits), dim=-1).values > 0.5).long().sum(dim=-1)
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
    if task.kind == "regression":
        return torch.tensor([float(lab) for lab in labels], dtype=torch.float32)
    if task.kind == "survival":
        rows = [(float(lab[0]), float(lab[1])) for lab in labels]  # type: ignore[index]
        return torch.tensor(rows, dtype=torch.float32).reshape(len(labels), 2)
    return torch.tensor([int(lab) for lab in labels], dtype=torch.long)
