#!/usr/bin/env python
"""Top-M vs whole-bag prediction and heatmap quality on synthetic lesion slides, after a short training.

    python benchmarks/inference.py --out /tmp/bench_inf --n-slides 32 --epochs 30 --seeds 0 1 2

Per seed: writes a lesion dataset (`ips.synthetic.lesions`), trains a tiny IPS model with `ips.train.train`
(slide labels only), then on the held-out test split reports accuracy and AUROC of the `topm` (as
trained) and `all` (exact streaming attention over every patch) predictions, and the mean per-slide AUROC
of the heatmap (attention of every patch) against the planted lesions on positive slides. `--json FILE`
writes the rows.

Results page rows: docs/BENCHMARKS.md, "Top-M against whole-bag prediction" and "Heatmaps find planted lesions".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from ips.config import ExperimentConfig
from ips.data.manifest import read_manifest
from ips.data.open import make_source
from ips.infer.engine import infer_slide
from ips.model.checkpoint import load_model
from ips.model.metrics import auroc
from ips.synthetic.lesions import make_lesion_dataset
from ips.training.loop import train


def config(args: argparse.Namespace, seed: int) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "model": {
                "encoder": args.encoder,
                "in_chans": 3,
                "patch_size": args.patch_size,
                "d_model": 32,
                "n_heads": 4,
                "d_mlp": 32,
                "pos_enc": args.pos_enc,
                "tasks": [{"name": "lesion", "kind": "binary", "label_column": "label"}],
            },
            "selection": {"memory_size": args.memory_size, "iter_size": 64, "prefetch": 0},
            "data": {"augment": True, "read_threads": 1},
            "train": {
                "epochs": args.epochs,
                "batch_size": 4,
                "lr": 3e-3,
                "weight_decay": 0.0,
                "warmup_epochs": 0.5,
                "seed": seed,
                "device": "cpu",
                "monitor": "train_loss",
            },
        }
    )


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, object]:
    out = Path(args.out) / f"seed{seed}"
    t0 = time.perf_counter()
    manifest = out / "manifest.csv"
    if not manifest.exists():
        make_lesion_dataset(
            out, args.n_slides, args.size, args.patch_size, seed=seed, split_fractions=(0.7, 0.0, 0.3)
        )
    cfg = config(args, seed)
    train(cfg, manifest=manifest, run_dir=out / "run", show_progress=False, log=lambda s: None, resume=False)
    t_train = time.perf_counter() - t0
    model, cfg = load_model(out / "run" / "checkpoints" / "last.pt")
    records = read_manifest(manifest, cfg.model.tasks, "test")
    logits: dict[str, list[float]] = {"topm": [], "all": []}
    labels, any_lesion, mostly = [], [], []
    for r in records:
        inf = infer_slide(
            model,
            make_source(r, cfg),
            memory_size=cfg.selection.memory_size,
            iter_size=64,
            modes=("topm", "all"),
        )
        for mode in logits:
            logits[mode].append(float(inf.logits[mode]["lesion"][0]))
        labels.append(int(r.labels["lesion"]))
        if labels[-1]:
            truth = np.asarray(zarr.open_group(r.path, mode="r")["ips_truth/lesion"][...])
            any_lesion.append(auroc(inf.attention[:, 0], truth > 0))
            mostly.append(auroc(inf.attention[:, 0], truth >= 0.5))
    y = np.asarray(labels)
    row: dict[str, object] = {"seed": seed, "n_test": len(y), "train_seconds": round(t_train, 1)}
    for mode, values in logits.items():
        x = np.asarray(values)
        row[f"{mode}_accuracy"] = float(((x > 0) == y).mean())
        row[f"{mode}_auroc"] = auroc(x, y == 1)
    row["heatmap_auroc_any"] = float(np.mean(any_lesion))
    row["heatmap_auroc_half"] = float(np.nanmean(mostly))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-slides", type=int, default=32)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--memory-size", type=int, default=8)
    parser.add_argument("--encoder", default="ips_cnn_tiny")
    parser.add_argument("--pos-enc", default="none", choices=("none", "sincos"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(args, seed))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
