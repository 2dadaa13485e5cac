#!/usr/bin/env python
"""Heatmap AUROC of a trained checkpoint against the stores' planted truth, for one split of a manifest.

    python tools/heatmap_truth_auroc.py --checkpoint R/checkpoints/last.pt --manifest D/manifest.csv \
        --truth digit --out R/heat_test [--split test] [--limit 50] [--threads 1]

Runs `ips heatmap` (exact attention of every patch) on the split's stores, then prints, for each task, the
mean per-slide AUROC of the attention against `ips_truth/<truth>` (`ips.demo.lesion_auroc`): "any"
counts every patch the truth touches as positive, "core" only those it covers by >= 0.25 (the slivers at
an object's edge left out). Slides without a positive or a negative patch are skipped (NaN).
`--truth digit` for Megapixel MNIST (`tools/megapixel_mnist.py`), `lesion` for the lesion and
small-object sets. Writes `summary.json` beside the heatmaps.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from small_object_benchmark import CORE_SHARE


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--truth", default="lesion", help="array under ips_truth/ (lesion, digit)")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=0, help="only the first N slides of the split (0: all)")
    p.add_argument("--threads", default="1")
    a = p.parse_args(argv)

    from ips.cli.main import main as ips_main
    from ips.config import ExperimentConfig
    from ips.data.manifest import resolve_path
    from ips.demo import lesion_auroc
    from ips.model.checkpoint import load_checkpoint

    manifest = Path(a.manifest)
    with open(manifest, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("split") == a.split]
    if a.limit:
        rows = rows[: a.limit]
    if not rows:
        print(f"{manifest}: no row of split {a.split!r}", file=sys.stderr)
        return 2
    stores = [resolve_path(r["path"], manifest.parent)[0] for r in rows]
    out = Path(a.out)
    args = ["heatmap", "--checkpoint", a.checkpoint, *stores, "--out", str(out), "--top-k", "0"]
    if ips_main([*args, "--threads", a.threads]) != 0:
        return 2
    tasks = [t.name for t in ExperimentConfig.from_dict(load_checkpoint(a.checkpoint)["config"]).model.tasks]
    pairs = [(out / r["slide_id"] / "scores.zarr", s) for r, s in zip(rows, stores, strict=True)]
    summary: dict[str, dict[str, float]] = {}
    for i, task in enumerate(tasks):
        anyshare = [lesion_auroc(sc, st, task=i, truth=a.truth) for sc, st in pairs]
        core = [lesion_auroc(sc, st, task=i, min_share=CORE_SHARE, truth=a.truth) for sc, st in pairs]
        summary[task] = {
            "heatmap_auroc": float(np.nanmean(anyshare)),
            "heatmap_auroc_core": float(np.nanmean(core)),
            "n_slides": int(np.sum(~np.isnan(anyshare))),
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
