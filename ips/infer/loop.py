"""The per-slide loops of `ips predict` and `ips heatmap`: one bad store never stops the others; each
failure is kept with a one-line reason (`ips.errors.run_each`). The CLI only parses arguments and
prints; `ips demo` calls these. Every prediction goes through the checkpoint's `Predictor`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ips.data.manifest import SlideRecord
from ips.errors import ConfigError, Failure, run_each
from ips.infer.engine import Loaded, load

__all__ = ["Loaded", "PredictReport", "heatmap_slides", "load", "predict_slides", "store_records"]


@dataclass
class PredictReport:
    """What a prediction run produced: files written, metrics (when labels are known), the per-task
    logits of each predicted slide `{slide_id: {task: (n_out,)}}`, failures."""

    predictions: Path
    metrics_file: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    n_done: int = 0
    failures: list[Failure] = field(default_factory=list)
    logits: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


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


def _timed(log: Callable[[str], None] | None, n: int, work: Callable[[SlideRecord], tuple[int, str]]):
    """`work(record)` -> (patches, suffix), each success logged as `[i/n] slide: N patches, s.s s suffix`."""
    position = iter(range(1, n + 1))

    def run(record: SlideRecord) -> int:
        i, t0 = next(position), time.perf_counter()
        n_patches, suffix = work(record)
        if log:
            log(f"[{i}/{n}] {record.slide_id}: {n_patches} patches, {time.perf_counter() - t0:.1f}s{suffix}")
        return n_patches

    return run


def predict_slides(
    loaded: Loaded,
    records: Sequence[SlideRecord],
    out: Path,
    *,
    mode: str = "topm",
    checkpoint: str = "",
    log: Callable[[str], None] | None = None,
) -> PredictReport:
    """Predict every record; write `out/predictions.csv` and, with labels, `out/metrics.json`.

    `topm` (as trained): `Predictor.predict`, the numbers training's validation reports; `all`: from
    every patch by the exact online softmax (`Predictor.infer`)."""
    from ips.infer.predictions import (
        labelled_metrics,
        prediction_rows,
        write_metrics_json,
        write_predictions_csv,
    )

    tasks = loaded.cfg.model.tasks
    out.mkdir(parents=True, exist_ok=True)
    report = PredictReport(out / "predictions.csv")

    def predict_one(record: SlideRecord) -> tuple[int, str]:
        source = loaded.open(record)
        if mode == "topm":
            report.logits[record.slide_id] = loaded.predictor.predict(source)
        else:
            report.logits[record.slide_id] = loaded.predictor.infer(source, modes=(mode,)).logits[mode]
        return len(source), ""

    done, report.failures = run_each(
        records,
        _timed(log, len(records), predict_one),
        name=lambda r: r.slide_id,
        path=lambda r: r.path,
        log=log,
    )
    rows: list[dict[str, str]] = []
    logits: dict[str, list] = {t.name: [] for t in tasks}
    labels: dict[str, list] = {t.name: [] for t in tasks}
    for record, _ in done:
        for task in tasks:
            value, label = report.logits[record.slide_id][task.name], record.labels.get(task.name)
            rows.append(prediction_rows(task, record.slide_id, value, label))
            logits[task.name].append(value)
            labels[task.name].append(label)
    write_predictions_csv(report.predictions, tasks, rows)
    report.n_done = len(done)
    report.metrics = labelled_metrics(tasks, logits, labels)
    if report.metrics:
        extra = {
            "mode": mode,
            "checkpoint": checkpoint,
            "n_slides": report.n_done,
            "failed": [f.name for f in report.failures],
        }
        report.metrics_file = write_metrics_json(out / "metrics.json", report.metrics, extra)
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
    scale: str = "slide",
    threshold: float = 0.0,
) -> list[Failure]:
    """Heatmaps of every record under `out/<slide_id>/`; returns the failures (the others are drawn).
    `scale`: colours per slide ("slide"), the viewer's fixed scale on every slide ("global",
    `ips.infer.scale.global_scale`), or one scale for the slides drawn together ("cohort": their highest
    peak, `ips.infer.scale.cohort_scale`); the shared scales' PNGs are drawn after every slide's pass.
    `threshold`: log2 ratio to uniform at or below which nothing is painted."""
    from ips.infer.heatmap import HeatmapResult, draw_overlays, select_tasks, write_slide_heatmaps
    from ips.infer.scale import cohort_scale, global_scale

    shown = select_tasks(loaded.cfg.model.tasks, task)  # an unknown task is bad usage, before any work
    shared = scale in ("global", "cohort")
    results: dict[str, HeatmapResult] = {}  # shared scales: each slide's peaks and titles (no per-patch data)

    def draw_one(record: SlideRecord) -> tuple[int, str]:
        result = write_slide_heatmaps(
            loaded,
            record,
            out / record.slide_id,
            task=task,
            top_k=top_k,
            mode=mode,
            thumb_size=thumb_size,
            checkpoint=checkpoint,
            threshold=threshold,
            overlays=not shared,
        )
        if shared:
            results[record.slide_id] = result
        return result.n_patches, f" -> {result.out_dir}"

    done, failures = run_each(
        records,
        _timed(log, len(records), draw_one),
        name=lambda r: r.slide_id,
        path=lambda r: r.path,
        log=log,
    )
    if not shared or not done:
        return failures
    drawn = [results[r.slide_id] for r, _ in done]
    if scale == "cohort":
        scales = [cohort_scale([r.peaks[j] for r in drawn], threshold) for j in range(len(shown))]
    else:
        scales = [global_scale(threshold)] * len(shown)
    if log:
        names = [loaded.cfg.model.tasks[t].name for t in shown]
        for name, s in zip(names, scales):
            log(
                f"{scale} colour scale of {name} over {len(drawn)} slides: full colour at {2**s.top:.3g}x uniform"
            )
    _, late = run_each(
        [r for r, _ in done],
        lambda r: draw_overlays(results[r.slide_id], r.path, scales),
        name=lambda r: r.slide_id,
        path=lambda r: r.path,
        log=log,
    )
    return [*failures, *late]
