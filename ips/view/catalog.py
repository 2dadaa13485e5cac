"""The slides `ips view` serves: given stores or a manifest, plus optional heatmap and prediction folders.

A slide is known by its id only (the store's name, or the manifest's `slide_id`); requests name ids, never
paths, so nothing outside the stores the viewer was started with can be reached.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ips.errors import ConfigError


@dataclass
class TaskPrediction:
    """One task's row of predictions.csv: probabilities by class (binary: `{1: p}`), prediction, label."""

    task: str
    probabilities: dict[int, float]
    prediction: str
    label: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "probabilities": {str(k): v for k, v in self.probabilities.items()},
            "prediction": self.prediction,
            "label": self.label,
        }


@dataclass
class SlideEntry:
    """A served slide: its store, heatmap folder (None: no overlay), predictions and manifest label."""

    slide_id: str
    store: str
    heatmap: Path | None = None
    predictions: list[TaskPrediction] = field(default_factory=list)
    label: str = ""


def slide_id_of(path: str | Path) -> str:
    """`DIR/<slide_id>.zarr` -> `<slide_id>`."""
    name = Path(str(path).rstrip("/")).name
    return name[: -len(".zarr")] if name.endswith(".zarr") else name


def read_manifest_rows(path: Path, split: str | None = None) -> list[tuple[str, str, str]]:
    """`(slide_id, store path, label)` of each manifest row (relative paths against the manifest's folder),
    only those of `split` when given."""
    if not path.is_file():
        raise ConfigError(f"--manifest {path}: no such file")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        if "slide_id" not in header or "path" not in header:
            raise ConfigError(f"--manifest {path}: needs columns slide_id and path (has {', '.join(header)})")
        if split is not None and "split" not in header:
            raise ConfigError(f"--split {split}: the manifest {path} has no split column")
        reader.fieldnames = header
        rows = []
        for row in reader:
            if split is not None and (row.get("split") or "").strip() != split:
                continue
            store = (row.get("path") or "").strip()
            if store and "://" not in store and not Path(store).is_absolute():
                store = str(path.parent / store)
            rows.append(((row.get("slide_id") or "").strip(), store, (row.get("label") or "").strip()))
    return rows


def read_predictions(path: Path) -> dict[str, list[TaskPrediction]]:
    """predictions.csv (`ips predict`) -> slide_id -> one `TaskPrediction` per task."""
    if not path.is_file():
        raise ConfigError(f"--predictions {path}: no such file")
    out: dict[str, list[TaskPrediction]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            probs = {
                int(k[5:]): float(v)
                for k, v in row.items()
                if k and k.startswith("prob_") and v not in ("", None)
            }
            out.setdefault(row.get("slide_id", ""), []).append(
                TaskPrediction(row.get("task", ""), probs, row.get("prediction", ""), row.get("label", ""))
            )
    return out


def build_catalog(
    stores: Sequence[str | Path],
    manifest: str | Path | None = None,
    heatmaps: str | Path | None = None,
    predictions: str | Path | None = None,
    split: str | None = None,
) -> dict[str, SlideEntry]:
    """slide_id -> `SlideEntry`, in the order given. Raises ConfigError on bad usage (no slides, a duplicate
    id, a missing store, folder or file)."""
    rows: list[tuple[str, str, str]] = [(slide_id_of(s), str(s), "") for s in stores]
    if manifest is not None:
        rows += read_manifest_rows(Path(manifest), split)
    if not rows:
        raise ConfigError("give stores or --manifest (with slides of --split): there is nothing to show")
    if heatmaps is not None and not Path(heatmaps).is_dir():
        raise ConfigError(f"--heatmaps {heatmaps}: not a directory")
    preds = read_predictions(Path(predictions)) if predictions is not None else {}
    catalog: dict[str, SlideEntry] = {}
    for slide_id, store, label in rows:
        if not slide_id:
            raise ConfigError(f"store {store}: empty slide id")
        if slide_id in catalog:
            raise ConfigError(f"slide id {slide_id!r} given twice ({catalog[slide_id].store} and {store})")
        if "://" not in store and not Path(store).is_dir():
            raise ConfigError(f"store {store} does not exist")
        heat = Path(heatmaps) / slide_id if heatmaps is not None else None
        if heat is not None and not (heat / "scores.zarr").is_dir():
            heat = None
        entry = SlideEntry(slide_id, store, heat, preds.get(slide_id, []), label)
        if not entry.label and entry.predictions:
            entry.label = entry.predictions[0].label
        catalog[slide_id] = entry
    return catalog


def unmatched(
    catalog: dict[str, SlideEntry],
    heatmaps: str | Path | None = None,
    predictions: str | Path | None = None,
) -> list[str]:
    """One warning line per kind of input that names slides the viewer does not serve: heatmap folders
    (`DIR/<slide_id>/scores.zarr`) and prediction rows whose slide id matches no slide (usually a
    different manifest, or stores renamed after `ips heatmap`)."""
    lines = []
    if heatmaps is not None and Path(heatmaps).is_dir():
        names = sorted(
            d.name for d in Path(heatmaps).iterdir() if (d / "scores.zarr").is_dir() and d.name not in catalog
        )
        if names:
            lines.append(
                f"--heatmaps {heatmaps}: {_few(names)} match no slide served (folders are named by slide id)"
            )
    if predictions is not None and Path(predictions).is_file():
        names = sorted(k for k in read_predictions(Path(predictions)) if k not in catalog)
        if names:
            lines.append(f"--predictions {predictions}: rows of {_few(names)} match no slide served")
    return lines


def _few(names: list[str], shown: int = 8) -> str:
    """`3 (a, b, c)`, or the first `shown` and how many more."""
    more = f", and {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} ({', '.join(repr(n) for n in names[:shown])}{more})"


WORKLIST_FILE = "suggestions.csv"
MAX_WORKLIST_ROWS = 100_000


@dataclass(frozen=True)
class WorkItem:
    """One row of `ips suggest`'s worklist: the slide, its score and rank, and its regions' GeoJSON (or
    None)."""

    slide_id: str
    score: float
    rank: int
    regions: Path | None


def read_worklist(folder: str | Path) -> list[WorkItem]:
    """`DIR/suggestions.csv` (`slide_id,score,rank[,regions]`; regions: a GeoJSON path relative to DIR,
    else `DIR/regions/<slide_id>.geojson` when there is one), by rank. ConfigError naming the file for a
    missing file or column or a value that is not a number; a regions path that leaves DIR is ignored."""
    root = Path(folder)
    path = root / WORKLIST_FILE
    if not path.is_file():
        raise ConfigError(
            f"--worklist {folder}: no {WORKLIST_FILE} in it (the --out folder of `ips suggest`)"
        )
    items = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in ("slide_id", "score", "rank") if c not in header]
        if missing:
            raise ConfigError(f"{path}: needs columns slide_id, score, rank (missing {', '.join(missing)})")
        reader.fieldnames = header
        for line, row in enumerate(reader, start=2):
            if line > MAX_WORKLIST_ROWS:
                break
            slide_id = (row.get("slide_id") or "").strip()
            try:
                score, rank = float(row.get("score") or "nan"), int(float(row.get("rank") or ""))
            except ValueError:
                raise ConfigError(f"{path} line {line}: score and rank must be numbers") from None
            items.append(WorkItem(slide_id, score, rank, _regions(root, row.get("regions") or "", slide_id)))
    return sorted(items, key=lambda w: w.rank)


def _regions(root: Path, text: str, slide_id: str) -> Path | None:
    """The regions file of a row, only when it lies inside the worklist folder (no links)."""
    candidate = root / text.strip() if text.strip() else root / "regions" / f"{slide_id}.geojson"
    try:
        inside = candidate.resolve().is_relative_to(root.resolve())
    except OSError:
        return None
    return candidate if inside and candidate.is_file() and not candidate.is_symlink() else None
