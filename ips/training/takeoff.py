"""The take-off guard: has a run's AUROC (or C-index) left chance by the epoch the recipe expects it to?

A run that learns a task from slide labels shows its AUROC climbing within the first dozen epochs; one
that stalls sits at chance (0.5, or below) and more epochs do not rescue it (README, "When the model
stays at chance"). The guard looks once, at `train.takeoff_epoch`: per task, the mean AUROC over the
last `WINDOW` epochs up to it (validation where the manifest has a val split, else training), against
`train.takeoff_auroc`. Each task is judged by its kind's ranking metric (`ips.model.metrics.TAKEOFF_METRIC`),
chance 0.5 for all: binary by its AUROC, multiclass and multilabel by their macro AUROC (the mean over
classes), regression, ordinal and survival tasks by Harrell's concordance index.

Everything here is pure: a verdict from a metric history, a message from a verdict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ips.config import TaskConfig
from ips.model.metrics import TAKEOFF_METRIC

CHANCE = 0.5
# epochs averaged at the check: one epoch's validation AUROC on a small split is noisy
WINDOW = 3


@dataclass(frozen=True)
class Verdict:
    """The guard's finding at `epoch`: per judged task, its mean AUROC (C-index) over `epochs` on `split`.

    `stalled`: the tasks whose score has not reached `threshold` (empty: the run took off)."""

    epoch: int
    split: str
    epochs: tuple[int, ...]
    scores: dict[str, float]
    threshold: float
    stalled: tuple[str, ...]
    c_index_tasks: tuple[str, ...] = ()  # the judged tasks scored by C-index rather than AUROC

    @property
    def fired(self) -> bool:
        return bool(self.stalled)

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "epochs": list(self.epochs),
            "stalled": list(self.stalled),
            "c_index_tasks": list(self.c_index_tasks),
        }


def check_epoch(takeoff_epoch: int | None, epochs: int) -> int | None:
    """The epoch the guard looks at; None when it is off or the run is shorter than that."""
    if takeoff_epoch is None or epochs < takeoff_epoch:
        return None
    return takeoff_epoch


def judge_takeoff(
    history: Sequence[Mapping[str, Any]],
    *,
    tasks: Sequence[TaskConfig],
    epoch: int,
    threshold: float,
    window: int = WINDOW,
) -> Verdict | None:
    """The verdict at `epoch` from per-epoch metric rows (`metrics.jsonl`: `epoch`, `val_<task>/auroc`,
    `train_<task>/auroc`, `val_<task>/c_index`, ...); None while the history has not reached `epoch`.

    The window is the rows with `epoch - window < row.epoch <= epoch`; NaN values (a class absent from
    the split) are left out, and a task with no value in the window is not judged."""
    rows = [r for r in history if epoch - window < int(r["epoch"]) <= epoch]
    if not any(int(r["epoch"]) == epoch for r in rows):
        return None
    keys = {t.name: f"{t.name}/{TAKEOFF_METRIC[t.kind]}" for t in tasks if t.kind in TAKEOFF_METRIC}
    has_val = any(f"val_{key}" in r for r in rows for key in keys.values())
    split = "val" if has_val else "train"
    scores: dict[str, float] = {}
    for name, key in keys.items():
        values = [float(r[f"{split}_{key}"]) for r in rows if f"{split}_{key}" in r]
        values = [v for v in values if not math.isnan(v)]
        if values:
            scores[name] = sum(values) / len(values)
    stalled = tuple(name for name, score in scores.items() if score < threshold)
    epochs = tuple(sorted(int(r["epoch"]) for r in rows))
    by_c = tuple(name for name, key in keys.items() if key.endswith("/c_index"))
    return Verdict(epoch, split, epochs, scores, threshold, stalled, by_c)


def takeoff_message(
    verdict: Verdict,
    *,
    pretrained: bool,
    explore: float,
    explore_novel: float,
    restart_seed: int | None = None,
) -> str:
    """One line: which tasks stayed at chance, what to try (given what the run already used), and
    whether the run restarts (from `restart_seed`) or goes on."""
    first, last = verdict.epochs[0], verdict.epochs[-1]
    span = f"mean of epochs {first}-{last}" if first != last else f"epoch {last}"
    scores = ", ".join(f"{name} {verdict.scores[name]:.2f}" for name in verdict.stalled)
    metric = "C-index" if set(verdict.stalled) <= set(verdict.c_index_tasks) else "AUROC"
    if verdict.c_index_tasks and set(verdict.stalled) - set(verdict.c_index_tasks):
        metric = "AUROC / C-index"
    tries = []
    if not pretrained:
        tries.append("pretraining (ips pretrain, then model.pretrained=DIR/encoder.pt)")
    if explore == 0:
        tries.append("selection.explore=0.25")
    elif explore_novel == 1.0:
        tries.append("selection.explore_novel=0.5 if artefacts are the slides' most unusual patches")
    tries.append("annotations on a few slides (manifest column annotation)")
    tries.append("an overlapping grid (ips prep --stride) if objects are larger than a patch")
    then = f"restarting from train.seed={restart_seed}" if restart_seed is not None else "going on"
    return (
        f"take-off guard: at epoch {verdict.epoch} the {verdict.split} {metric} ({span}) has not left "
        f"chance: {scores} < train.takeoff_auroc {verdict.threshold:g}; try {'; '.join(tries)} "
        f"(README: When the model stays at chance); {then}"
    )
