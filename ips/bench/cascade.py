"""`ips bench cascade`: the selection pass with and without the cascade, on the same generated slides.

1. Two generated slides written by the real writer (pyramid included): textured pixels in every patch
   and a few round lesions (darker, purple, a few patches across; about 2% of the patches) that are
   visible at low magnification, as the regions a pathology model attends to are. One slide teaches,
   the other is measured (another seed: other places).
2. One model (`ips.bench.models.bench_config`, fresh) whose attention is then taught to rank lesion
   patches first (its aggregator and projection fitted on the teaching slide's embeddings, the
   encoder as it is): a stand-in for a trained model, in seconds. Its coarse scorer is distilled
   from that attention (`ips.algo.cascade.distill_loss` on the top patches plus random ones), as
   training would teach it.
3. On the measured slide, `repeats` rounds: the full pass (`Selector`) and the cascade
   (`Selector.run_cascade`: coarse pass over the store's 4x level, then exact top-M among the
   candidates), each timed end to end (reads included). `recall_top_m`: the share of the full pass's
   top-M among the cascade's candidates.

JSON (the `cascade` key): `{"n_patches", "full_seconds", "cascade_seconds", "ratio", "recall_top_m",
...}`; the seconds are the fastest of the repeats, `ratio_median` pairs each round's two passes,
`cpu_ratio` compares the process CPU time of the two (all threads: the work done, which a shared
machine disturbs less than the wall time).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ips.algo.cascade import CascadeSettings, candidate_recall, distill_loss
from ips.bench.common import describe_device, format_table, timed
from ips.bench.models import bench_config
from ips.bench.stores import grid_store, textured
from ips.config import with_overrides
from ips.data.coarse import coarse_view
from ips.data.zarr_source import ZarrPatchSource
from ips.infer.engine import Selector
from ips.model.coarse import attach_coarse_scorer
from ips.model.ips_model import IPSModel, build_model
from ips.runtime import Runtime


@dataclass(frozen=True)
class CascadeBench:
    """What `run_cascade_bench` measures: N patches per slide (`calibration_patches` on the slide the
    scorer learns from; None: N, at most 4,000), the model and selection sizes, the cascade's
    candidates and factor, the distillation (`distill_steps` batches of `distill_batch` patches),
    timed `repeats`."""

    n_patches: int = 10_000
    calibration_patches: int | None = None
    encoder: str = "ips_resnet10"
    patch_size: int = 32
    memory_size: int = 32
    iter_size: int = 256
    candidates: float = 0.1
    factor: int = 4
    scorer_width: int = 16
    distill_steps: int = 100
    distill_batch: int = 256
    repeats: int = 1
    read_threads: int = 2
    prefetch: int = 2
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_patches < 1 or self.repeats < 1 or self.distill_steps < 0:
            raise ValueError("n_patches and repeats must be >= 1, distill_steps >= 0")
        if self.patch_size % self.factor:
            raise ValueError(f"patch_size {self.patch_size} must divide by the factor {self.factor}")

    @property
    def calibration(self) -> int:
        return self.calibration_patches or min(self.n_patches, 4_000)


LESION_SHARE = 0.02  # of the patches
LESION_RADIUS = 2.5  # patches


def lesion_store(root: Path, n_patches: int, *, patch_size: int, seed: int) -> tuple[Path, np.ndarray]:
    """A 2D store with a grid of exactly `n_patches` textured patches (`ips.bench.stores.textured`),
    `LESION_SHARE` of them in round lesions (darker, purple). Returns the store and the lesion cells
    `(rows, cols)` bool of the grid (a cell: one patch; reused when the store is complete)."""
    side = math.ceil(math.sqrt(n_patches))
    rows = math.ceil(n_patches / side)
    rng = np.random.default_rng(seed)
    per = math.pi * LESION_RADIUS**2
    centers = rng.uniform((0, 0), (rows, side), size=(max(2, round(LESION_SHARE * n_patches / per)), 2))
    r, c = np.mgrid[:rows, :side]
    cells = np.zeros((rows, side), dtype=bool)
    for cy, cx in centers:
        cells |= (r + 0.5 - cy) ** 2 + (c + 0.5 - cx) ** 2 <= LESION_RADIUS**2
    cells.reshape(-1)[n_patches:] = False
    name = f"cascade_n{n_patches}_p{patch_size}_s{seed}"
    image = textured((3, rows * patch_size, side * patch_size), seed)
    tint = np.array([0.55, 0.35, 0.75])[:, None, None]
    for y, x in zip(*np.nonzero(cells)):
        box = (
            slice(None),
            slice(y * patch_size, (y + 1) * patch_size),
            slice(x * patch_size, (x + 1) * patch_size),
        )
        image[box] = (image[box] * tint).astype(np.uint8)
    return grid_store(image, root, name, n_patches=n_patches, patch_size=patch_size), cells


def lesion_of(source: ZarrPatchSource, cells: np.ndarray, patch_size: int) -> np.ndarray:
    """Per patch of `source` `(N,)` bool: does it lie in a lesion."""
    cell = source.coords // patch_size  # (N, 2) row, col
    return cells[cell[:, 0], cell[:, 1]]


def teach_attention(
    model: IPSModel,
    source: ZarrPatchSource,
    lesion: np.ndarray,
    *,
    steps: int,
    generator: np.random.Generator,
) -> np.ndarray:
    """Fit the model's aggregator so that lesion patches of `source` rank first: `distill_loss`
    towards the lesion indicator on the slide's content embeddings (one full pass, the encoder as it
    is; without positions, so that it learns what lesions look like, not where this slide has them).
    Returns the taught model's selection score of every patch `(N,)` float32."""
    content = torch.empty(len(source), model.d_model)

    def record(idx: torch.Tensor, c: torch.Tensor, emb: torch.Tensor) -> None:
        content[idx] = c.float().cpu()

    dev = model.pixel_mean.device
    Selector(1, 256, runtime=Runtime(dev))(model, source, observe=record)
    pos = torch.from_numpy(source.positions())
    target = torch.from_numpy(lesion.astype(np.float32))
    optimizer = torch.optim.AdamW(model.aggregator.parameters(), lr=1e-2)
    for _ in range(steps):
        idx = torch.from_numpy(generator.choice(len(source), size=min(len(source), 1024), replace=False))
        scores = model.selection_scores(content[idx].to(dev)[None])[0]
        loss = distill_loss(scores, target[idx].to(dev))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        emb = model.add_position(content.to(dev), pos.to(dev))
        return model.selection_scores(emb[None])[0].float().cpu().numpy()


def distill_scorer(
    model: IPSModel,
    coarse: torch.Tensor,
    teacher: np.ndarray,
    *,
    steps: int,
    batch: int,
    top: int,
    generator: np.random.Generator,
) -> list[float]:
    """Fit `model.coarse_scorer` to the ranking `teacher` `(N,)` of the coarse patches `coarse`
    `(N, C, *S)`: each step the `top` best patches plus random others, `distill_loss`, AdamW.
    Returns the loss of each step."""
    scorer = model.coarse_scorer
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=3e-3)
    best = np.argsort(-teacher, kind="stable")[:top]
    t = torch.from_numpy(teacher)
    losses = []
    scorer.train()
    for _ in range(steps):
        rest = generator.choice(len(teacher), size=min(len(teacher), batch) - len(best), replace=False)
        idx = torch.from_numpy(np.unique(np.concatenate([best, rest])))
        loss = distill_loss(scorer(coarse[idx]), t[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    scorer.eval()
    return losses


def run_cascade_bench(
    bench: CascadeBench, *, store_dir: str | Path | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Measure the full pass and the cascade on the same generated slide (see the module doc); the
    `cascade` JSON payload."""
    rt = Runtime.create(bench.device, key="--device")
    cfg = bench_config(
        encoder=bench.encoder,
        patch_size=bench.patch_size,
        memory_size=bench.memory_size,
        iter_size=bench.iter_size,
        batch_size=1,
        device=str(rt.device),
        read_threads=bench.read_threads,
        prefetch=bench.prefetch,
    )
    # no positional encoding: a fresh model's attention is nearly all position (its content embeddings
    # vary far less than the position codes), and the taught attention must be about what patches show
    cfg = with_overrides(cfg, model={"pos_enc": "none"})
    settings = CascadeSettings(bench.candidates, bench.factor)
    tmp = tempfile.TemporaryDirectory(prefix="ips-bench-") if store_dir is None else None
    root = Path(tmp.name if tmp else store_dir)  # type: ignore[arg-type]
    try:
        t0 = time.perf_counter()
        teach_store, teach_cells = lesion_store(
            root, bench.calibration, patch_size=bench.patch_size, seed=bench.seed + 1
        )
        store, cells = lesion_store(root, bench.n_patches, patch_size=bench.patch_size, seed=bench.seed)
        log(f"stores ready in {time.perf_counter() - t0:.1f} s")
        torch.manual_seed(bench.seed)
        model = build_model(cfg.model).to(rt.device)
        attach_coarse_scorer(model, width=bench.scorer_width)
        full = Selector.from_config(cfg.selection, rt)
        cascade = dataclasses.replace(full, cascade=settings)
        teaching = ZarrPatchSource(teach_store, read_threads=bench.read_threads)
        t0 = time.perf_counter()
        rng = np.random.default_rng(bench.seed)
        teacher = teach_attention(
            model, teaching, lesion_of(teaching, teach_cells, bench.patch_size), steps=200, generator=rng
        )
        coarse = coarse_view(teaching, bench.factor).read(np.arange(len(teaching)))
        log(f"attention taught in {time.perf_counter() - t0:.1f} s; distilling the coarse scorer")
        t0 = time.perf_counter()
        losses = distill_scorer(
            model,
            coarse.to(rt.device),
            teacher,
            steps=bench.distill_steps,
            batch=bench.distill_batch,
            top=4 * bench.memory_size,
            generator=rng,
        )
        distill_seconds = time.perf_counter() - t0
        source = ZarrPatchSource(store, read_threads=bench.read_threads)
        coarse_level = getattr(coarse_view(source, bench.factor), "level", None)
        lesion = lesion_of(source, cells, bench.patch_size)
        times: dict[str, list[float]] = {"full": [], "cascade": []}
        cpu: dict[str, list[float]] = {"full": [], "cascade": []}
        recalls, overlaps, in_lesion = [], [], []
        for r in range(bench.repeats):
            c0 = time.process_time()
            t_full, sel = timed(lambda: full(model, source), rt.device)
            c1 = time.process_time()
            t_cas, run = timed(lambda: cascade.run_cascade(model, source), rt.device)
            cpu["full"].append(c1 - c0)
            cpu["cascade"].append(time.process_time() - c1)
            times["full"].append(t_full)
            times["cascade"].append(t_cas)
            top = sel.indices.numpy()
            recalls.append(candidate_recall(top, run.candidates))
            in_lesion.append(float(lesion[top].mean()))
            overlaps.append(float(np.isin(top, run.selection.indices.numpy()).mean()))
            log(
                f"repeat {r + 1}/{bench.repeats}: full {t_full:.2f} s, cascade {t_cas:.2f} s, recall {recalls[-1]:.3f}"
            )
    finally:
        if tmp is not None:
            tmp.cleanup()
    best = {k: min(v) for k, v in times.items()}
    n = len(source)
    return {
        "n_patches": n,
        "full_seconds": round(best["full"], 6),
        "cascade_seconds": round(best["cascade"], 6),
        "ratio": round(best["cascade"] / best["full"], 4),
        "recall_top_m": round(statistics.mean(recalls), 4),
        "device": describe_device(rt.device),
        "torch_threads": torch.get_num_threads(),
        "memory_size": bench.memory_size,
        "ratio_median": round(statistics.median(c / f for c, f in zip(times["cascade"], times["full"])), 4),
        "cpu_ratio": round(min(cpu["cascade"]) / min(cpu["full"]), 4),
        "full_cpu_seconds": round(min(cpu["full"]), 4),
        "cascade_cpu_seconds": round(min(cpu["cascade"]), 4),
        "selected_overlap": round(statistics.mean(overlaps), 4),
        "candidates": settings.count(n, bench.memory_size),
        "coarse_level": coarse_level,
        "lesion_patches": int(lesion.sum()),
        "full_top_m_in_lesions": round(statistics.mean(in_lesion), 4),
        "slides_per_hour_full": round(3600 / best["full"], 1),
        "slides_per_hour_cascade": round(3600 / best["cascade"], 1),
        "full_seconds_all": [round(v, 4) for v in times["full"]],
        "cascade_seconds_all": [round(v, 4) for v in times["cascade"]],
        "distill_seconds": round(distill_seconds, 2),
        "distill_loss_first_last": [round(losses[0], 4), round(losses[-1], 4)] if losses else None,
        "calibration_patches": len(teaching),
        "settings": {k: v for k, v in dataclasses.asdict(bench).items() if k != "n_patches"},
    }


def cascade_table(result: dict[str, Any]) -> str:
    """The payload as a short text table."""
    rows = [
        ["full pass", result["full_seconds"], result["slides_per_hour_full"]],
        ["cascade", result["cascade_seconds"], result["slides_per_hour_cascade"]],
    ]
    table = format_table(["pass", "seconds", "slides/hour"], rows)
    return (
        f"{result['device']}, N = {result['n_patches']}, M = {result['memory_size']}, "
        f"K = {result['candidates']}\n{table}\nratio {result['ratio']} (median of pairs "
        f"{result['ratio_median']}), recall of the full top-M among the candidates {result['recall_top_m']}"
    )
