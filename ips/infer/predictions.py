"""Predictions of a set of slides: rows of `predictions.csv` and `metrics.json` (a contract: docs/ARCHITECTURE.md).

`predictions.csv`: one row per slide and task, columns `slide_id, task, prob_..., prediction, label`
(and `time, event` when a task is of kind survival): binary tasks fill `prob_1` (P(positive));
multiclass and ordinal tasks `prob_0 .. prob_{C-1}`; multilabel tasks one `prob_c` per label;
regression and survival tasks no `prob_` cell. With tasks of different kinds the columns are the union
(a cell a task does not use is empty). `prediction` is the class (binary, multiclass, ordinal), the
`;`-separated predicted labels (multilabel, the manifest's format), the predicted value (regression) or
the risk score (survival: the log hazard ratio, higher = an earlier event); `label` the known label in
the manifest's format, empty when unknown; survival tasks give theirs as `time` and `event`.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ips.config import TaskConfig
from ips.data.manifest import Label
from ips.model.metrics import evaluate_logits
from ips.model.tasks import label_tensor, predictions, probabilities


def prob_columns(tasks: Sequence[TaskConfig]) -> list[str]:
    """`prob_c` columns that the tasks use, in class order (binary: `prob_1`)."""
    used: set[int] = set()
    for t in tasks:
        if t.kind == "binary":
            used |= {1}
        elif t.kind not in ("regression", "survival"):
            used |= set(range(t.num_classes))
    return [f"prob_{c}" for c in sorted(used)]


def csv_columns(tasks: Sequence[TaskConfig]) -> list[str]:
    survival = ["time", "event"] if any(t.kind == "survival" for t in tasks) else []
    return ["slide_id", "task", *prob_columns(tasks), "prediction", "label", *survival]


def format_label(task: TaskConfig, label: Label | None) -> str:
    if label is None or task.kind == "survival":
        return ""
    if task.kind == "multilabel":
        return ";".join(str(c) for c in (label if isinstance(label, (tuple, list)) else [label]))
    if task.kind == "regression":
        return repr(float(label))  # type: ignore[arg-type]
    return str(int(label))  # type: ignore[arg-type]


def prediction_rows(
    task: TaskConfig, slide_id: str, logits: torch.Tensor, label: Label | None
) -> dict[str, str]:
    """One CSV row from a task's logits `(n_out,)`."""
    x = logits.float().reshape(1, -1)
    prob = probabilities(task, x)[0]
    pred = predictions(task, x)[0]
    row = {"slide_id": slide_id, "task": task.name, "label": format_label(task, label)}
    if task.kind in ("regression", "survival"):
        row["prediction"] = f"{float(pred):.6g}"
        if task.kind == "survival" and label is not None:
            row["time"], row["event"] = repr(float(label[0])), str(int(label[1]))  # type: ignore[index]
    elif task.kind == "binary":
        row["prob_1"] = f"{float(prob):.6g}"
        row["prediction"] = str(int(pred))
    else:
        row.update({f"prob_{c}": f"{float(p):.6g}" for c, p in enumerate(prob)})
        if task.kind in ("multiclass", "ordinal"):
            row["prediction"] = str(int(pred))
        else:
            row["prediction"] = ";".join(str(c) for c in range(len(pred)) if int(pred[c]))
    return row


def write_predictions_csv(
    path: str | Path, tasks: Sequence[TaskConfig], rows: Sequence[Mapping[str, str]]
) -> Path:
    """Write the rows (atomically: a temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=csv_columns(tasks), restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def labelled_metrics(
    tasks: Sequence[TaskConfig],
    logits: Mapping[str, Sequence[torch.Tensor]],
    labels: Mapping[str, Sequence[Label | None]],
) -> dict[str, float]:
    """`ips.metrics.evaluate_logits` per task over the slides whose label of that task is known.

    logits: task -> per-slide `(n_out,)`; labels: task -> per-slide label or None. Adds
    `<task>/n_slides`; `loss` (the weighted sum of task losses) only when every task has labels.
    Empty when no label is known.
    """
    out: dict[str, float] = {}
    total, complete = 0.0, True
    for task in tasks:
        known = [(lg, lab) for lg, lab in zip(logits[task.name], labels[task.name]) if lab is not None]
        if not known:
            complete = False
            continue
        stacked = torch.stack([lg.float().reshape(-1) for lg, _ in known])  # (S, n_out)
        target = label_tensor(task, [lab for _, lab in known])  # type: ignore[misc]
        metrics = evaluate_logits([task], {task.name: stacked}, {task.name: target})
        metrics.pop("loss")
        out.update(metrics)
        out[f"{task.name}/n_slides"] = float(len(known))
        total += task.weight * metrics[f"{task.name}/loss"]
    if out and complete:
        out["loss"] = total
    return out


def write_metrics_json(path: str | Path, metrics: Mapping[str, float], extra: Mapping[str, object]) -> Path:
    """`{"metrics": {...}, **extra}`; NaN (e.g. AUROC with one class) is written as null."""
    path = Path(path)
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"metrics": clean, **extra}, indent=1))
    os.replace(tmp, path)
    return path
