#!/usr/bin/env python
"""Each head beyond classification on a generated task whose truth is known: a lesion's size.

    python benchmarks/heads.py --out /tmp/heads --json heads.json            # every head
    python benchmarks/heads.py --out /tmp/heads --heads survival --epochs 5  # one, short
    python benchmarks/heads.py --out /tmp/heads_s1 --heads survival,discrete --seed 1  # Cox against discrete

The slides: 1-channel 64 x 64 grey noise in a grid of 8 x 8 patches; a slide of size k (0..3, drawn
evenly) holds one lesion, a checkerboard square of side 2k + 2 px in one patch (none for k = 0). The
labels are functions of k alone:
- regression `size`: k;
- ordinal `grade`: k (4 classes);
- survival `os` (head `survival`: Cox; head `discrete`: the discrete-time likelihood, `--bins` bins):
  time = exp(-k) * E, E ~ Exponential(1) (proportional hazards, hazard ratio e per unit of
  k; `--time-noise lognormal`: time = exp(-k + Z / 2), Z ~ Normal(0, 1), a cleaner signal), censored at
  an independent Uniform(0, 3) time (event = 1 where the event comes first).
Each head trains on its own (the tiny config of the tests, `train.epochs` epochs) and is scored on the
val slides at its best epoch by val loss; `truth` is the same metric of k itself (the ceiling a model
can reach: for survival, the C-index of the true risk k).

Results page row: docs/BENCHMARKS.md, "Heads".
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data_prep.convert import PrepOptions, convert_array
from ips.config import ExperimentConfig
from ips.model.metrics import concordance_index, regression_metrics
from ips.training.loop import train

PATCH, SIZE = 8, 64
CHECKER = np.where((np.arange(PATCH)[:, None] // 2 + np.arange(PATCH)[None, :] // 2) % 2 == 0, 40, 120)

HEADS = {
    "regression": {"name": "size", "kind": "regression"},
    "ordinal": {"name": "grade", "kind": "ordinal", "num_classes": 4},
    "survival": {"name": "os", "kind": "survival"},
    # the same labels with the discrete-time likelihood (per-slide; bins: quantiles of the training event times)
    "discrete": {"name": "os", "kind": "survival", "loss": "discrete", "num_classes": 4},
    # a control for survival: regression on -log(time), censoring ignored (the time as if it were the event's)
    "logtime": {"name": "neglogtime", "kind": "regression"},
}
# the metrics reported per head (val split, best epoch by val loss)
REPORTED = {
    "regression": ("mae", "r2", "pearson", "c_index"),
    "ordinal": ("accuracy", "mae", "c_index"),
    "survival": ("c_index",),
    "discrete": ("c_index",),
    "logtime": ("r2", "pearson", "c_index"),
}


def make_slides(out: Path, n_train: int, n_val: int, seed: int, time_noise: str) -> tuple[Path, list[dict]]:
    """Stores `out/<id>.zarr` and `out/manifest.csv` (slide_id, path, split, size, grade, time, event)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    options = PrepOptions(patch_size=PATCH, min_tissue=0.0, thumbnail=False, hash_source=False)
    rows = []
    for i in range(n_train + n_val):
        k = i % 4
        img = rng.integers(40, 120, size=(1, SIZE, SIZE), dtype=np.uint8)
        if k:
            side = 2 * k + 2
            r, c = (rng.integers(0, SIZE // PATCH, size=2) * PATCH).tolist()
            r, c = r + int(rng.integers(0, PATCH - side + 1)), c + int(rng.integers(0, PATCH - side + 1))
            img[0, r : r + side, c : c + side] = CHECKER[:side, :side]
        slide_id = f"s{i:03d}"
        if not (out / f"{slide_id}.zarr").exists():
            convert_array(img, out, slide_id, options=options, mask=np.ones((SIZE, SIZE), dtype=bool))
        noise = rng.exponential() if time_noise == "exponential" else float(np.exp(rng.normal() / 2))
        t_event, t_censor = float(np.exp(-k) * noise), float(rng.uniform(0, 3))
        rows.append(
            {
                "slide_id": slide_id,
                "path": f"{slide_id}.zarr",
                "split": "train" if i < n_train else "val",
                "size": k,
                "grade": k,
                "time": f"{min(t_event, t_censor):.6f}",
                "event": int(t_event <= t_censor),
                "neglogtime": f"{-np.log(min(t_event, t_censor)):.6f}",
            }
        )
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest, rows


def truth_metrics(head: str, val: list[dict]) -> dict[str, float]:
    """The reported metrics of a perfect reader of k (the ceiling)."""
    k = np.array([r["size"] for r in val], dtype=float)
    if head == "logtime":
        y = np.array([float(r["neglogtime"]) for r in val])
        m = regression_metrics(k, y)
        return {
            "r2": m["r2"],
            "pearson": m["pearson"],
            "c_index": concordance_index(-k, y, np.ones(len(k))),
        }
    if head in ("survival", "discrete"):
        time_, event = np.array([float(r["time"]) for r in val]), np.array([r["event"] for r in val])
        return {"c_index": concordance_index(k, time_, event)}
    m = regression_metrics(k, k)
    c = concordance_index(-k, k, np.ones(len(k)))
    if head == "ordinal":
        return {"accuracy": 1.0, "mae": 0.0, "c_index": c}
    return {**m, "c_index": c}


def run_head(head: str, manifest: Path, run_dir: Path, args: argparse.Namespace) -> dict:
    cfg = ExperimentConfig.from_dict(
        {
            "model": {
                "encoder": "ips_cnn_tiny",
                "encoder_norm": "group",
                "in_chans": 1,
                "patch_size": PATCH,
                "d_model": 32,
                "n_heads": 4,
                "d_mlp": 32,
                "tasks": [{**HEADS[head], "num_classes": args.bins} if head == "discrete" else HEADS[head]],
            },
            "selection": {"memory_size": 4, "iter_size": 16, "prefetch": 1, "explore": args.explore},
            "data": {"augment": False},
            "train": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "weight_decay": 0.0,
                "warmup_epochs": 0.5,
                "seed": args.seed,
                "takeoff_epoch": None,
            },
        }
    )
    t0 = time.perf_counter()
    result = train(cfg, manifest=manifest, run_dir=run_dir, show_progress=False, log=lambda s: None)
    seconds = time.perf_counter() - t0
    best = min(result.history, key=lambda r: r["val_loss"])
    name = HEADS[head]["name"]
    return {
        "epoch": best["epoch"],
        "seconds": round(seconds, 1),
        **{m: best[f"val_{name}/{m}"] for m in REPORTED[head]},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the slides and runs")
    p.add_argument("--heads", default=",".join(HEADS), help="comma-separated: " + ", ".join(HEADS))
    p.add_argument("--train", type=int, default=96, help="training slides")
    p.add_argument("--val", type=int, default=48, help="validation slides")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8, help="slides per step (survival: the Cox risk set)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--explore", type=float, default=0.0, help="selection.explore (training)")
    p.add_argument("--bins", type=int, default=4, help="time bins of the discrete-time survival head")
    p.add_argument("--time-noise", choices=("exponential", "lognormal"), default="exponential")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    manifest, rows = make_slides(out / "slides", args.train, args.val, args.seed, args.time_noise)
    val = [r for r in rows if r["split"] == "val"]
    results = {}
    for head in args.heads.split(","):
        run = out / f"run_{head}"
        if run.exists():
            import shutil

            shutil.rmtree(run)
        results[head] = {"model": run_head(head, manifest, run, args)}
        results[head]["truth"] = truth_metrics(head, val)
        print(head, json.dumps(results[head]), flush=True)
    summary = {**{k: v for k, v in vars(args).items() if k != "json"}, "heads": results}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
