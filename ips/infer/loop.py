"""The per-slide loops of `ips predict` and `ips heatmap`: one bad store never stops the others; each
failure is kept with a one-line reason. The CLI only parses arguments and prints; `ips demo` calls these."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from ips.config import ExperimentConfig
from ips.data.manifest import SlideRecord
from ips.errors import ConfigError, IpsError
from ips.model import IPSModel


@dataclass
class Loaded:
    """A checkpoint's model on its device, in eval mode, with the config it was trained with."""

    model: IPSModel
    cfg: ExperimentConfig
    device: torch.device
    autocast_dtype: torch.dtype | None


@dataclass
class Failure:
    slide_id: str
    path: str
    reason: str


@dataclass
class PredictReport:
    """What a prediction run produced: files written, metrics (when labels are known), failures."""

    predictions: Path
    metrics_file: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    n_done: int = 0
    failures: list[Failure] = field(default_factory=list)


def load(checkpoint: str | Path, device_name: str) -> Loaded:
    """The checkpoint's model on the chosen device; CheckpointError / ConfigError (exit 2) if unusable."""
    from ips.model.checkpoint import load_model
    from ips.runtime import resolve_device

    device = resolve_device(device_name, key="--device")
    model, cfg = load_model(checkpoint, device)
    autocast = torch.bfloat16 if (cfg.train.amp and device.type == "cuda") else None
    return Loaded(model, cfg, device, autocast)


def store_records(stores: Sequence[str]) -> list[SlideRecord]:
    """One record per store path, slide_id from its name; ConfigError on a repeated slide id."""
    from ips.infer.heatmap import slide_id_of_store

    records: list[SlideRecord] = []
    seen: dict[str, str] = {}
    for s in stores:
        sid = slide_id_of_store(s)
        if sid in seen:
            raise ConfigError(f"two stores have the slide id {sid!r}: {seen[sid]} and {s}")
        seen[sid] = s
        records.append(SlideRecord(sid, s if "://" in s else str(Path(s))))  # URLs as given
    return records


def one_line(e: BaseException) -> str:
    """An exception as one line: its message (typed for unexpected kinds)."""
    text = (str(e).strip().splitlines() or [""])[0]
    return text if isinstance(e, IpsError) else f"{type(e).__name__}: {text}"


def predict_slides(
    loaded: Loaded,
    records: Sequence[SlideRecord],
    out: Path,
    *,
    mode: str = "topm",
    checkpoint: str = "",
    log: Callable[[str], None] | None = None,
) -> PredictReport:
    """Predict every record; write `out/predictions.csv` and, with labels, `out/metrics.json`."""
    from ips.data.open import make_source
    from ips.data.streaming import stream_chunks
    from ips.infer.predictions import (
        labelled_metrics,
        prediction_rows,
        write_metrics_json,
        write_predictions_csv,
    )
    from ips.infer.slide import check_model_fits, infer_slide

    cfg, tasks = loaded.cfg, loaded.cfg.model.tasks
    out.mkdir(parents=True, exist_ok=True)
    stream = partial(stream_chunks, prefetch=cfg.selection.prefetch, pin_memory=loaded.device.type == "cuda")
    rows: list[dict[str, str]] = []
    logits: dict[str, list] = {t.name: [] for t in tasks}
    labels: dict[str, list] = {t.name: [] for t in tasks}
    report = PredictReport(out / "predictions.csv")
    for i, record in enumerate(records, 1):
        t0 = time.perf_counter()
        try:
            source = make_source(record, cfg)
            check_model_fits(source, cfg, f"store {record.path}")
            inf = infer_slide(
                loaded.model,
                source,
                memory_size=cfg.selection.memory_size,
                iter_size=cfg.selection.iter_size,
                modes=(mode,),
                score=cfg.selection.score,
                device=loaded.device,
                stream=stream,
                autocast_dtype=loaded.autocast_dtype,
            )
        except Exception as e:  # noqa: BLE001 - one bad store must not stop the others
            report.failures.append(Failure(record.slide_id, record.path, one_line(e)))
            if log:
                log(f"[{i}/{len(records)}] {record.slide_id}: FAILED: {one_line(e)}")
            continue
        for task in tasks:
            value = inf.logits[mode][task.name]
            label = record.labels.get(task.name)
            rows.append(prediction_rows(task, record.slide_id, value, label))
            logits[task.name].append(value)
            labels[task.name].append(label)
        if log:
            log(
                f"[{i}/{len(records)}] {record.slide_id}: {inf.n_patches} patches, {time.perf_counter() - t0:.1f}s"
            )
    write_predictions_csv(report.predictions, tasks, rows)
    report.n_done = len(records) - len(report.failures)
    report.metrics = labelled_metrics(tasks, logits, labels)
    if report.metrics:
        report.metrics_file = write_metrics_json(
            out / "metrics.json",
            report.metrics,
            {
                "mode": mode,
                "checkpoint": checkpoint,
                "n_slides": report.n_done,
                "failed": [f.slide_id for f in report.failures],
            },
        )
    return report


def heatmap_slides(
    loaded: Loaded,
    records: Sequence[SlideRecord],
    out: Path,
    *,
    task: str | None = None,
    top_k: int = 16,
    mode: str = "topm",
    thumb_size: int = 1024,
    checkpoint: str = "",
    log: Callable[[str], None] | None = None,
) -> list[Failure]:
    """Heatmaps of every record under `out/<slide_id>/`; returns the failures (the others are drawn)."""
    from ips.infer.heatmap import select_tasks, write_slide_heatmaps

    select_tasks(loaded.cfg.model.tasks, task)  # an unknown task is bad usage, before any work
    failures: list[Failure] = []
    for i, record in enumerate(records, 1):
        t0 = time.perf_counter()
        try:
            result = write_slide_heatmaps(
                loaded.model,
                loaded.cfg,
                record,
                out / record.slide_id,
                task=task,
                top_k=top_k,
                mode=mode,
                device=loaded.device,
                autocast_dtype=loaded.autocast_dtype,
                thumb_size=thumb_size,
                checkpoint=checkpoint,
            )
        except Exception as e:  # noqa: BLE001 - one bad store must not stop the others
            failures.append(Failure(record.slide_id, record.path, one_line(e)))
            if log:
                log(f"[{i}/{len(records)}] {record.slide_id}: FAILED: {one_line(e)}")
            continue
        if log:
            log(
                f"[{i}/{len(records)}] {record.slide_id}: {result.n_patches} patches, "
                f"{time.perf_counter() - t0:.1f}s -> {result.out_dir}"
            )
    return failures
