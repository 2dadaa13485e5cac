"""`ips suggest`: one inference pass per slide and run, the scores of `ips.infer.suggest`, and the files.

Under `out/`:

- `suggestions.csv`: `slide_id,score,rank` (rank 1 = annotate first; at most `budget` rows, best first)
  then the components (`uncertainty, disagreement, attention_entropy, novelty`), `n_patches` and
  `regions` (the slide's GeoJSON, relative to `out/`; empty for a volume);
- `regions/<slide_id>.geojson`: the suggested regions of each suggested 2D slide, one rectangle per
  patch in level-0 pixels (`[x, y]`, QuPath's order), `objectType` `annotation`, classification
  `SUGGESTED_CLASS`, `properties.rank` and the region score as a measurement.

Candidates are the records without an `annotation`; the annotated ones are the set novelty is measured
against (they are passed through the model only when novelty is scored). Every prediction goes through
each checkpoint's `Predictor` (`ips.infer.engine`).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ips.config import ConfigError
from ips.data.manifest import SlideRecord
from ips.data.store import open_store
from ips.errors import Failure, run_each
from ips.infer.engine import Loaded
from ips.infer.geojson import boxes_xy
from ips.infer.heatmap import grid_geometry
from ips.infer.suggest import (
    COMPONENTS,
    Candidate,
    Ranked,
    attention_entropy,
    categorical,
    rank_slides,
    region_scores,
    top_regions,
    uncertainty_and_disagreement,
)
from ips.model.tasks import probabilities

CSV_NAME = "suggestions.csv"
REGIONS_DIR = "regions"
SUGGESTED_CLASS = "IPS suggestion"
SUGGESTED_COLOUR = [255, 200, 0]
COLUMNS = ("slide_id", "score", "rank", *COMPONENTS, "n_patches", "regions")


@dataclass(frozen=True)
class SuggestPlan:
    """What to suggest: `budget` slides, `regions` patches outlined in each, the score `use`s these
    components (`ips.infer.suggest.COMPONENTS`)."""

    budget: int
    regions: int = 5
    use: tuple[str, ...] = COMPONENTS

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ConfigError(f"--budget must be >= 1, got {self.budget}")
        if self.regions < 0:
            raise ConfigError(f"--regions must be >= 0, got {self.regions}")
        bad = [c for c in self.use if c not in COMPONENTS]
        if bad or not self.use:
            raise ConfigError(
                f"--by: unknown component {bad[0] if bad else ''!r}; valid: {', '.join(COMPONENTS)}"
            )


@dataclass
class SlideSeen:
    """One slide through R runs: per-task categorical distributions `(R, L, K)`, attention `(R, N, T)`,
    mean patch content embedding `(R, D)`, and where its patches are (2D: level-0 `(N, 2)` corners and size)."""

    dists: list[np.ndarray]
    attention: np.ndarray
    embedding: np.ndarray
    level0: np.ndarray | None = None
    size0: np.ndarray | None = None


@dataclass
class SlideSummary:
    """What ranking and the files need of one slide, O(D + regions) (the O(N) attention is dropped once
    summarised): the components, the mean embedding over runs `(D,)`, N, and the best regions (patch
    index, region score, level-0 box `(x0, y0, x1, y1)`), best first; None for a volume."""

    uncertainty: float
    disagreement: float
    attention_entropy: float
    embedding: np.ndarray
    n_patches: int
    regions: list[tuple[int, float, tuple[int, int, int, int]]] | None


def summarise(seen: SlideSeen, k: int) -> SlideSummary:
    """The components of one slide and its `k` best regions (`ips.infer.suggest`)."""
    u, d = uncertainty_and_disagreement(seen.dists)
    regions = None
    if seen.level0 is not None and seen.size0 is not None:
        scores = region_scores(seen.attention)
        best = top_regions(scores, k)
        boxes = boxes_xy(seen.level0[best], seen.size0).tolist()
        regions = [(int(i), float(scores[i]), tuple(b)) for i, b in zip(best, boxes, strict=True)]
    return SlideSummary(
        u, d, attention_entropy(seen.attention), seen.embedding.mean(axis=0), seen.attention.shape[1], regions
    )


@dataclass
class SuggestReport:
    csv: Path
    ranked: list[Ranked] = field(default_factory=list)
    n_candidates: int = 0
    n_annotated: int = 0
    failures: list[Failure] = field(default_factory=list)


class _MeanEmbedding:
    """A chunk observer: the running sum of the patches' content embeddings `(D,)` (without position: what
    the tissue looks like, not where it is) in float64, and their count."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.n = 0

    def __call__(self, indices: torch.Tensor, content: torch.Tensor, emb: torch.Tensor) -> None:
        s = content.detach().to(torch.float64).sum(dim=0).cpu()
        self.total = s if self.total is None else self.total + s
        self.n += content.shape[0]

    def mean(self) -> np.ndarray:
        if self.total is None:
            raise ValueError("no patches were seen")
        return (self.total / self.n).numpy()


def check_same_tasks(runs: Sequence[Loaded], names: Sequence[str]) -> None:
    """All runs predict the same tasks of the same kinds (ConfigError naming the checkpoint otherwise)."""
    first = [(t.name, t.kind, t.num_classes) for t in runs[0].cfg.model.tasks]
    for run, name in zip(runs[1:], names[1:], strict=True):
        if [(t.name, t.kind, t.num_classes) for t in run.cfg.model.tasks] != first:
            raise ConfigError(f"--checkpoint {name}: its tasks differ from those of {names[0]}")


def see_slide(runs: Sequence[Loaded], record: SlideRecord) -> SlideSeen:
    """One pass of each run's predictor over the record's store."""
    dists: list[list[np.ndarray]] = []
    attention, embedding = [], []
    level0 = size0 = None
    for run in runs:
        source = run.open(record)
        mean = _MeanEmbedding()
        inf = run.predictor.infer(source, modes=("topm",), observe=mean)
        logits = inf.logits["topm"]
        dists.append([probabilities(t, logits[t.name][None])[0].numpy() for t in run.cfg.model.tasks])
        attention.append(inf.attention)
        embedding.append(mean.mean())
        if level0 is None and source.spatial_dims == 2:
            geom = grid_geometry(open_store(record.path), source, run.sources)
            level0, size0 = geom.level0, geom.size0
    tasks = runs[0].cfg.model.tasks
    per_task = [categorical(t.kind, np.stack([d[i] for d in dists])) for i, t in enumerate(tasks)]
    return SlideSeen(per_task, np.stack(attention), np.stack(embedding), level0, size0)


def write_regions(path: Path, regions: Sequence[tuple[int, float, tuple[int, int, int, int]]]) -> Path:
    """One slide's regions (patch, score, level-0 box) as QuPath GeoJSON annotations, written atomically."""
    features = [
        {
            "type": "Feature",
            "id": f"suggestion-{rank}",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
            },
            "properties": {
                "objectType": "annotation",
                "name": f"suggestion {rank}",
                "classification": {"name": SUGGESTED_CLASS, "color": SUGGESTED_COLOUR},
                "rank": rank,
                "patch": patch,
                "measurements": {"region score": float(f"{score:.7g}")},
            },
        }
        for rank, (patch, score, (x0, y0, x1, y1)) in enumerate(regions, 1)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    os.replace(tmp, path)
    return path


def suggest_slides(
    runs: Sequence[Loaded],
    records: Sequence[SlideRecord],
    out: Path,
    plan: SuggestPlan,
    *,
    log: Callable[[str], None] | None = None,
) -> SuggestReport:
    """Rank the unannotated records (module docstring); write the CSV and the regions under `out`."""
    candidates = [r for r in records if not r.annotation]
    annotated = [r for r in records if r.annotation] if "novelty" in plan.use else []
    report = SuggestReport(out / CSV_NAME, n_candidates=len(candidates), n_annotated=len(annotated))
    todo = [*candidates, *annotated]
    position = iter(range(1, len(todo) + 1))

    def see(record: SlideRecord) -> SlideSummary:
        i = next(position)
        summary = summarise(see_slide(runs, record), plan.regions)
        if log:
            tag = " (annotated)" if record.annotation else ""
            log(f"[{i}/{len(todo)}] {record.slide_id}{tag}: {summary.n_patches} patches")
        return summary

    done, report.failures = run_each(todo, see, name=lambda r: r.slide_id, path=lambda r: r.path, log=log)
    seen = {r.slide_id: s for r, s in done}
    pool = [
        Candidate(r.slide_id, s.uncertainty, s.disagreement, s.attention_entropy, s.embedding)
        for r in candidates
        if (s := seen.get(r.slide_id)) is not None
    ]
    reference = [seen[r.slide_id].embedding for r in annotated if r.slide_id in seen]
    dim = pool[0].embedding.shape[0] if pool else 1
    report.ranked = rank_slides(
        pool, np.stack(reference) if reference else np.zeros((0, dim)), plan.budget, plan.use
    )
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in report.ranked:
        s = seen[r.slide_id]
        regions = ""
        if s.regions:
            regions = f"{REGIONS_DIR}/{r.slide_id}.geojson"
            write_regions(out / regions, s.regions)
        rows.append(
            {
                "slide_id": r.slide_id,
                "score": f"{r.score:.6g}",
                "rank": r.rank,
                **{c: f"{getattr(r, c):.6g}" for c in COMPONENTS},
                "n_patches": s.n_patches,
                "regions": regions,
            }
        )
    tmp = out / f".{CSV_NAME}.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, report.csv)
    return report
