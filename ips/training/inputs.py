"""A training run's inputs: the manifest's train and val slides, each store checked against the model,
the annotations of annotated training slides, and the metric that picks the best checkpoint."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ips.config import ConfigError, ExperimentConfig, TaskConfig
from ips.data.annotations import PatchLabels, patch_labels
from ips.data.manifest import SlideRecord, read_manifest
from ips.data.open import SourceFactory
from ips.data.store import open_store
from ips.infer.engine import check_model_fits
from ips.model.metrics import evaluate_logits
from ips.model.tasks import label_tensor, with_time_bins


@dataclass
class Inputs:
    """The slides of a run: `train`, `val`, the `monitor`ed metric as used, `annotations` (slide_id ->
    per-patch labels, for annotated training slides when guidance is on), and the run's `tasks` (the
    config's, discrete-time survival tasks given their time bins from the training slides)."""

    train: list[SlideRecord]
    val: list[SlideRecord]
    monitor: str
    annotations: dict[str, PatchLabels]
    tasks: tuple[TaskConfig, ...] = ()


def targets_for(records: Sequence[SlideRecord], tasks: Sequence[TaskConfig]) -> dict[str, torch.Tensor]:
    """The slides' labels per task `{task: (S, ...)}` (`ips.model.tasks.label_tensor`)."""
    return {t.name: label_tensor(t, [r.labels[t.name] for r in records]) for t in tasks}


def split_records(records: Sequence[SlideRecord]) -> tuple[list[SlideRecord], list[SlideRecord]]:
    train = [r for r in records if r.split in (None, "", "train")]
    val = [r for r in records if r.split == "val"]
    return train, val


def load_inputs(
    cfg: ExperimentConfig,
    manifest: str | Path,
    *,
    sources: SourceFactory,
    is_main: bool = True,
    log: Callable[[str], None] = print,
) -> Inputs:
    """The manifest's train and val slides, each store checked against the model; the monitored metric.

    Warns (`is_main`: rank 0) when there is no validation split or a task's training labels hold a
    single class."""
    records = read_manifest(manifest, cfg.model.tasks)
    train_records, val_records = split_records(records)
    if not train_records:
        raise ConfigError(f"{manifest}: no slides in the train split")
    tasks = with_time_bins(cfg.model.tasks, train_records)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tasks=tasks))
    for r in [*train_records, *val_records]:
        where = f"slide {r.slide_id} ({r.path})"
        check_model_fits(sources(r), cfg.model, features=sources.features, where=where, views=sources.views)
    monitor = check_monitor(cfg, train_records, bool(val_records))
    warn = log if is_main else (lambda _: None)
    if not val_records:
        warn(
            f"warning: {manifest} has no val split: nothing measures generalisation, and best.pt is chosen "
            f"by {monitor}"
        )
    for task in cfg.model.tasks:
        seen = {_label_key(r.labels[task.name]) for r in train_records}
        if len(seen) < 2:
            warn(
                f"warning: task {task.name!r}: every training slide has the label {next(iter(seen))}; the "
                "model can only learn that one class"
            )
    guided = cfg.train.annotation_weight + cfg.train.annotation_slots > 0
    annotations = {r.slide_id: _patch_labels(r, sources) for r in train_records if r.annotation and guided}
    if annotations:
        warn(
            f"{len(annotations)} of {len(train_records)} training slides are annotated: patch-level guidance "
            f"(train.annotation_slots {cfg.train.annotation_slots}, train.annotation_weight "
            f"{cfg.train.annotation_weight})"
        )
    return Inputs(train_records, val_records, monitor, annotations, tasks)


def _patch_labels(record: SlideRecord, sources: SourceFactory) -> PatchLabels:
    """The slide's annotation on the grid it is read from (one store open)."""
    store = open_store(record.path)
    return patch_labels(record.annotation, store, sources.grid_of(store), slide=record.slide_id)


def _label_key(label: Any) -> Any:
    return tuple(label) if isinstance(label, (list, tuple)) else label


def metric_names(tasks: Sequence[TaskConfig], records: Sequence[SlideRecord]) -> list[str]:
    """Every key an epoch's row can hold for these tasks: `train_loss`, `val_loss`, `{train,val}_<task>/<m>`."""
    sample = list(records[:1])
    targets = targets_for(sample, tasks)
    logits = {t.name: torch.zeros(len(sample), t.n_outputs) for t in tasks}
    names = [k for k in evaluate_logits(tasks, logits, targets) if k != "loss"]
    return ["train_loss", "val_loss", *(f"{split}_{n}" for split in ("train", "val") for n in names)]


def check_monitor(cfg: ExperimentConfig, train_records: Sequence[SlideRecord], has_val: bool) -> str:
    """`train.monitor` as used: ConfigError (with the closest name) for an unknown metric; a val metric
    without a val split falls back to `train_loss` (the warning says so)."""
    valid = metric_names(cfg.model.tasks, train_records)
    monitor = cfg.train.monitor
    if monitor not in valid:
        close = difflib.get_close_matches(monitor, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"train.monitor: unknown metric {monitor!r}{hint}; one of {', '.join(valid)}")
    if monitor.startswith("val_") and not has_val:
        return "train_loss"
    return monitor
