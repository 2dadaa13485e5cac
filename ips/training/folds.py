"""Cross-validation: k stratified folds of the manifest's train and val slides, one run per fold.

`ips cv --config CFG --manifest CSV --folds K --out OUT` writes `OUT/fold_<f>/manifest.csv` (fold f as
the val split, the other folds as train; test slides stay test in every fold), trains each into
`OUT/fold_<f>/run/` (take-off guard and restarts included, resumable), then summarises each metric
over the folds as `--seeds` does over seeds (`ips.training.seeds`: mean, sd, Student-t 95% interval) in
`OUT/summary.json`. Folds are stratified by the first task's label (survival: by event or censoring;
regression: not stratified) and drawn from `train.seed`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ips.config import ExperimentConfig, TaskConfig
from ips.data.manifest import ANNOTATION_COLUMN, SlideRecord, label_cells, read_manifest
from ips.errors import ConfigError
from ips.runtime import DistInfo
from ips.training.distributed import barrier
from ips.training.restarts import GuardedRun, train_with_restarts
from ips.training.seeds import SUMMARY, format_table, seed_metrics, summarize


def assign_folds(labels: Sequence[Hashable], k: int, seed: int) -> list[int]:
    """The fold (0..k-1) of each item: per label, the items in a random order dealt round-robin, the deal
    going on from class to class, so fold sizes differ by at most one and so do each class's counts."""
    if k < 2:
        raise ConfigError(f"--folds: at least 2, got {k}")
    if len(labels) < k:
        raise ConfigError(f"--folds {k}: only {len(labels)} train and val slides")
    rng = np.random.default_rng(seed)
    folds = [0] * len(labels)
    turn = 0
    for label in sorted(set(labels), key=repr):
        members = [i for i, x in enumerate(labels) if x == label]
        for i in rng.permutation(members):
            folds[int(i)] = turn % k
            turn += 1
    return folds


def _stratum(task: TaskConfig, label: Any) -> str:
    """The stratum of a slide for fold assignment: its class, its event flag (survival), or one for all
    (regression)."""
    if task.kind == "regression":
        return ""
    if task.kind == "survival":
        return str(int(label[1]))
    return ";".join(str(v) for v in label) if isinstance(label, (list, tuple)) else str(label)


def write_fold_manifest(
    records: Sequence[SlideRecord], splits: Sequence[str], tasks: Sequence[TaskConfig], path: Path
) -> Path:
    """A manifest of `records` with the given splits; paths as resolved from the original manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [
        "slide_id",
        "path",
        *dict.fromkeys(c for t in tasks for c in t.columns),
        "split",
        ANNOTATION_COLUMN,
    ]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r, split in zip(records, splits):
            labels = {c: v for t in tasks for c, v in label_cells(t, r.labels[t.name]).items()}
            writer.writerow(
                [r.slide_id, r.path, *(labels[c] for c in columns[2:-2]), split, r.annotation or ""]
            )
    return path


def run_folds(
    cfg: ExperimentConfig,
    folds: int,
    *,
    manifest: str | Path,
    out: str | Path,
    dist_info: DistInfo | None = None,
    resume: bool = True,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train `cfg` once per fold into `out/fold_<f>/run/`; write `out/summary.json` (rank 0), return it."""
    dist_info = dist_info or DistInfo()
    out = Path(out)
    records = read_manifest(manifest, cfg.model.tasks)
    pool = [r for r in records if r.split != "test"]
    test = [r for r in records if r.split == "test"]
    first = cfg.model.tasks[0]
    fold_of = assign_folds([_stratum(first, r.labels[first.name]) for r in pool], folds, cfg.train.seed)
    runs: dict[int, GuardedRun] = {}
    for f in range(folds):
        splits = ["val" if fold_of[i] == f else "train" for i in range(len(pool))] + ["test"] * len(test)
        fold_manifest = out / f"fold_{f}" / "manifest.csv"
        if dist_info.is_main:
            write_fold_manifest([*pool, *test], splits, cfg.model.tasks, fold_manifest)
        barrier(dist_info)
        n_val = splits.count("val")
        log(f"fold {f} of {folds}: {n_val} val, {len(pool) - n_val} train slides: {out / f'fold_{f}'}")
        runs[f] = train_with_restarts(
            cfg,
            manifest=fold_manifest,
            run_dir=out / f"fold_{f}" / "run",
            dist_info=dist_info,
            resume=resume,
            show_progress=show_progress,
            log=log,
        )
    per_fold = {f: seed_metrics(run) for f, run in runs.items()}
    summary = {
        "folds": folds,
        "fold_seed": cfg.train.seed,
        "monitor": runs[0].monitor,
        "interval": "Student t, n - 1 degrees of freedom: mean +- t * sd / sqrt(n)",
        "runs": [
            {"fold": f, "run_dir": str(run.run_dir), "attempts": run.attempts} for f, run in runs.items()
        ],
        "metrics": summarize(per_fold),
    }
    if dist_info.is_main:
        (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
        log(format_table(summary["metrics"]))
        log(f"summary of {folds} folds: {out / SUMMARY}")
    return summary
