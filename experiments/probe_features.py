#!/usr/bin/env python
"""Linear probe of an encoder's patch features against per-patch truth: do the features tell the object apart?

    python experiments/probe_features.py --manifest data/smallobj/manifest.csv --config configs/demo.yaml \
        [--encoder runs/pt/encoder.pt | --checkpoint runs/r/best.pt] [--slides 80]

Reads every grid patch of the first `--slides` training slides whose stores hold `ips_truth/lesion`
(and optionally `ips_truth/distractor`, written by `ips.synthetic`), embeds them with the model's encoder
in eval mode (no aggregator), fits a logistic regression on the patches of half of the slides and prints
the held-out AUROC of target patches (share > 0.25) against all others and against distractor patches
only. A scratch encoder (no `--encoder`) is the baseline: features that separate the target no better
than random ones cannot help the selection find it.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch
import zarr

from ips.config import load_config
from ips.data.zarr_source import ZarrPatchSource
from ips.model import build_model
from ips.model.metrics import auroc


def slide_features(model, store: Path, batch: int = 256, grid: str = "default") -> np.ndarray:
    """`(N, D)` encoder features of every patch of grid `grid` of one store (eval mode, no grad)."""
    src = ZarrPatchSource(store, grid=grid)
    out = []
    with torch.no_grad():
        for start in range(0, len(src), batch):
            idx = np.arange(start, min(len(src), start + batch))
            out.append(model.encoder(model.normalize(src.read(idx))).numpy())
    return np.concatenate(out)


def fit_probe(x: np.ndarray, y: np.ndarray, steps: int = 400) -> torch.nn.Linear:
    """Class-balanced logistic regression on standardised features (full batch, Adam)."""
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    lin = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-3)
    pos_weight = torch.tensor(float((1 - y).sum() / max(1.0, y.sum())))
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            lin(xt).squeeze(1), yt, pos_weight=pos_weight
        )
        loss.backward()
        opt.step()
    return lin


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--config", required=True)
    p.add_argument("--encoder", help="encoder.pt from ips pretrain (default: the config's own encoder)")
    p.add_argument("--checkpoint", help="a training checkpoint (best.pt/last.pt): probe its encoder")
    p.add_argument("--slides", type=int, default=80)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    overrides = list(args.overrides) + ([f"model.pretrained={args.encoder}"] if args.encoder else [])
    model = build_model(load_config(args.config, overrides).model)
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
    model.eval()
    rows = [r for r in csv.DictReader(args.manifest.open()) if r.get("split", "train") == "train"]
    feats, target, distractor, slide = [], [], [], []
    for i, row in enumerate(rows[: args.slides]):
        store = args.manifest.parent / row["path"]
        truth = zarr.open_group(str(store), mode="r")["ips_truth"]
        feats.append(slide_features(model, store))
        target.append(truth["lesion"][...] > 0.25)
        names = set(truth.array_keys())
        distractor.append(
            truth["distractor"][...] > 0.25 if "distractor" in names else np.zeros_like(target[-1])
        )
        slide.append(np.full(len(feats[-1]), i))
    x, y, d, s = (np.concatenate(a) for a in (feats, target, distractor, slide))
    fit, held = s % 2 == 0, s % 2 == 1
    mu, sd = x[fit].mean(0), x[fit].std(0) + 1e-6
    x = (x - mu) / sd
    lin = fit_probe(x[fit], y[fit].astype(np.float32))
    with torch.no_grad():
        score = lin(torch.tensor(x[held], dtype=torch.float32)).squeeze(1).numpy()
    yh, dh = y[held], d[held]
    vs_all = auroc(score, yh)
    vs_distractor = auroc(score[yh | dh], yh[yh | dh]) if dh.any() else float("nan")
    print(
        f"probe: {int(y.sum())} target patches of {len(y)} ({len(feats)} slides); held-out AUROC "
        f"target vs all {vs_all:.3f}, target vs distractors {vs_distractor:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
