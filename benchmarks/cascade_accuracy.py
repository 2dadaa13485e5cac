#!/usr/bin/env python
"""Cascade against full pass on one task: both arms trained per seed, then recall on the test slides.

    python benchmarks/cascade_accuracy.py run --manifest DATA/manifest.csv --out OUT --seeds 0 1 2 \\
        [--config configs/demo.yaml] [--arms full cascade] -- OVERRIDES
    python benchmarks/cascade_accuracy.py report OUT [OUT ...]

`run`: per arm and seed, `benchmarks/small_objects.py --manifest M --config C --out OUT/ARM/seed_S --
OVERRIDES train.seed=S` (the cascade arm adds `selection.cascade=true`); a finished run (its result.json)
is kept. Then, per cascade checkpoint, on every test slide: the full pass and the cascade of the same
trained model; recall = share of the full pass's top-M among the cascade's candidates, overlap = share
of it the cascade selects, and both passes' wall time (fastest of `--repeats`), written to
OUT/cascade/seed_S/recall.json. `report`: one markdown row per task, arm and seed.

Results page row: docs/BENCHMARKS.md, "Cascade"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

K_FACTORS = (2, 4, 8)  # candidate counts K = f x M at which recall is also read
HERE = Path(__file__).resolve().parent


def _fastest(fn, source, repeats: int):
    """(fastest wall seconds, least process CPU seconds, the last result) of `repeats` calls."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(source)
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu, out


def _positive(row: dict) -> bool:
    return next(iter(row["labels"].values()), 0.0) > 0


def measure_recall(checkpoint: Path, manifest: Path, repeats: int = 3) -> dict:
    """The cascade against the full pass of one cascade-trained checkpoint on the test slides."""
    from ips.algo.cascade import candidate_recall, coarse_candidates
    from ips.data.coarse import coarse_view
    from ips.data.manifest import read_manifest
    from ips.infer.engine import load

    loaded = load(checkpoint, "cpu")
    model, cascade = loaded.model, loaded.predictor.selector
    full = dataclasses.replace(cascade, cascade=None)
    rows = []
    for record in read_manifest(manifest, loaded.cfg.model.tasks, "test"):
        source = loaded.open(record)
        t_full, c_full, sel = _fastest(partial(full, model), source, repeats)
        t_casc, c_casc, run = _fastest(partial(cascade.run_cascade, model), source, repeats)
        ref = sel.indices.numpy()
        # the coarse scorer's whole ranking: recall at other candidate counts, no retraining
        factor = cascade.cascade.factor
        with torch.no_grad():
            idx, scores = coarse_candidates(
                model.coarse_scorer.eval(), coarse_view(source, factor), count=len(source), chunk_size=256
            )
        ranked = idx[np.lexsort((idx, -scores))]
        m = cascade.memory_size
        rows.append(
            {
                "slide_id": record.slide_id,
                "labels": {k: float(v) for k, v in record.labels.items() if v is not None},
                "n_patches": len(source),
                "n_candidates": len(run.candidates),
                "recall_top_m": candidate_recall(ref, run.candidates),
                "selected_overlap": float(np.isin(ref, run.selection.indices.numpy()).mean()),
                "recall_by_k": {f"{f}M": candidate_recall(ref, ranked[: f * m]) for f in K_FACTORS},
                "full_seconds": t_full,
                "cascade_seconds": t_casc,
                "full_cpu_seconds": c_full,
                "cascade_cpu_seconds": c_casc,
            }
        )
    full_s, casc_s = sum(r["full_seconds"] for r in rows), sum(r["cascade_seconds"] for r in rows)
    return {
        "recall_top_m": float(np.mean([r["recall_top_m"] for r in rows])),
        "recall_min": float(min(r["recall_top_m"] for r in rows)),
        "selected_overlap": float(np.mean([r["selected_overlap"] for r in rows])),
        # slides with a positive first label: where the top-M holds what the task is about
        "recall_top_m_positive": float(
            np.mean([r["recall_top_m"] for r in rows if _positive(r)] or [np.nan])
        ),
        "recall_by_k": {
            k: float(np.mean([r["recall_by_k"][k] for r in rows])) for k in rows[0]["recall_by_k"]
        },
        "n_patches_mean": float(np.mean([r["n_patches"] for r in rows])),
        "ratio": casc_s / full_s,
        "cpu_ratio": sum(r["cascade_cpu_seconds"] for r in rows) / sum(r["full_cpu_seconds"] for r in rows),
        "slides": rows,
    }


def run(a: argparse.Namespace) -> int:
    torch.set_num_threads(int(a.threads))
    out = Path(a.out)
    for seed in a.seeds:
        for arm in a.arms:
            run_dir = out / arm / f"seed_{seed}"
            extra = ["selection.cascade=true"] if arm == "cascade" else []
            if not (run_dir / "result.json").is_file():
                args = ["--manifest", a.manifest, "--config", a.config, "--out", str(run_dir)]
                args += ["--threads", a.threads, "--", *a.overrides, f"train.seed={seed}", *extra]
                subprocess.run([sys.executable, str(HERE / "small_objects.py"), *args], check=True)
            recall = run_dir / "recall.json"
            if arm == "cascade" and not recall.is_file():
                checkpoint = run_dir / "run" / "checkpoints" / "best.pt"
                result = measure_recall(checkpoint, Path(a.manifest), a.repeats)
                recall.write_text(json.dumps(result, indent=1))
    return 0


def report(a: argparse.Namespace) -> int:
    head = ["task", "seed", "arm", "test accuracy", "heatmap AUROC", "heatmap AUROC core", "CPU min"]
    head += ["recall", "recall, positive slides", "recall at 2M / 4M / 8M", "overlap"]
    print("| " + " | ".join(head) + " |")
    print("|---|---:|---|" + "---:|" * (len(head) - 3))
    for task_dir in map(Path, a.outs):
        results = task_dir.glob("*/seed_*/result.json")
        for result in sorted(results, key=lambda p: (p.parent.name, p.parts[-3])):
            r = json.loads(result.read_text())
            arm, seed = result.parts[-3], result.parent.name.removeprefix("seed_")
            rec_file = result.parent / "recall.json"
            rec = json.loads(rec_file.read_text()) if rec_file.is_file() else {}
            cpu = sum(r["cpu_min"].values())
            cells = [task_dir.name, seed, arm, f"{r['accuracy']:.3f}", f"{r['heatmap_auroc']:.3f}"]
            cells += [f"{r['heatmap_auroc_core']:.3f}", f"{cpu:.1f}"]
            if rec:
                by_k = " / ".join(f"{v:.3f}" for v in rec["recall_by_k"].values())
                cells += [f"{rec['recall_top_m']:.3f}", f"{rec['recall_top_m_positive']:.3f}", by_k]
                cells += [f"{rec['selected_overlap']:.3f}"]
            else:
                cells += [""] * 4
            print("| " + " | ".join(cells) + " |")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--manifest", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--config", default="configs/demo.yaml")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--arms", nargs="+", choices=["full", "cascade"], default=["full", "cascade"])
    r.add_argument("--threads", default="1")
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("overrides", nargs="*")
    r.set_defaults(func=run)
    s = sub.add_parser("report")
    s.add_argument("outs", nargs="+")
    s.set_defaults(func=report)
    a = p.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
