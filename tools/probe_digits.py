#!/usr/bin/env python
"""Linear probe of an encoder's patch features against the digit they show (Megapixel MNIST).

    python tools/probe_digits.py --manifest data/mmnist750/manifest.csv \
        --config configs/megapixel_mnist_cpu.yaml [--encoder runs/pt/encoder.pt | --checkpoint last.pt]

For each digit placed on the first `--canvases` training canvases (`ips_truth` attributes written by
`tools/megapixel_mnist.py`), takes the grid patch holding most of the digit's box, embeds it with the
model's encoder (eval mode), fits a 10-class logistic regression on the digits of the even canvases
and prints the held-out accuracy on the odd ones: all digits, and those whole inside one patch.
A fresh encoder (neither option) is the baseline.

Training canvases reuse a pool of MNIST images that training sees too, so after `ips train` the
even/odd split overstates how well *new* digits are read: `--held-out-split test` fits on the
training canvases and tests on that split's canvases, whose digits come from a separate pool.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch
import zarr
from probe_features import slide_features

from ips.config import load_config
from ips.model import build_model
from ips.synthetic.megapixel_mnist import DIGIT_SIZE, N_CLASSES


def best_patch(coords: np.ndarray, patch: int, row: int, col: int, size: int) -> tuple[int, float]:
    """Index of the grid patch (top-left `coords (N, 2)`) overlapping the box most, and that share."""
    oy = np.clip(np.minimum(coords[:, 0] + patch, row + size) - np.maximum(coords[:, 0], row), 0, None)
    ox = np.clip(np.minimum(coords[:, 1] + patch, col + size) - np.maximum(coords[:, 1], col), 0, None)
    area = oy * ox
    i = int(np.argmax(area))  # first of the largest: the lowest patch index
    return i, float(area[i]) / (size * size)


def digit_features(
    model: torch.nn.Module, cfg, root: Path, rows: list[dict[str, str]]
) -> tuple[np.ndarray, ...]:
    """Per placed digit of the canvases `rows`: the encoder feature of its best patch `(n, d)`, its class,
    its canvas's index in `rows` and the share of its box inside that patch."""
    feats, digits, canvas, share = [], [], [], []
    for i, row in enumerate(rows):
        store = root / row["path"]
        group = zarr.open_group(str(store), mode="r")
        # placements are in level-0 pixels; a grid on a coarser level (e.g. `halo`) is scaled up to them
        level = group[f"grids/{cfg.data.grid}"].attrs["level"]
        factor = int(group.attrs["ips"]["level_downsamples"][level][-1])
        coords = group[f"grids/{cfg.data.grid}/coords"][...][:, -2:] * factor
        x = slide_features(model, store, grid=cfg.data.grid)
        patch0 = cfg.model.patch_size * factor
        for pl in group["ips_truth"].attrs["placements"]:
            j, s = best_patch(coords, patch0, pl["row"], pl["col"], pl.get("size", DIGIT_SIZE))
            feats.append(x[j]), digits.append(pl["digit"]), canvas.append(i), share.append(s)
    return tuple(np.asarray(a) for a in (feats, digits, canvas, share))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--config", required=True)
    p.add_argument("--encoder", help="encoder.pt from ips pretrain")
    p.add_argument("--checkpoint", help="a training checkpoint: probe its encoder")
    p.add_argument("--canvases", type=int, default=400)
    p.add_argument("--held-out-split", help="test on this split's canvases (e.g. test) instead of odd ones")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(args.config, [f"model.pretrained={args.encoder}"] if args.encoder else [])
    model = build_model(cfg.model)
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=False)["model"])
    model.eval()
    rows = list(csv.DictReader(args.manifest.open()))
    train_rows = [r for r in rows if r["split"] == "train"][: args.canvases]
    x, y, c, s = digit_features(model, cfg, args.manifest.parent, train_rows)
    fit, held = c % 2 == 0, c % 2 == 1
    if args.held_out_split:
        other = [r for r in rows if r["split"] == args.held_out_split][: args.canvases]
        if not other:
            p.error(f"{args.manifest}: no canvas of split {args.held_out_split!r}")
        xo, yo, _, so = digit_features(model, cfg, args.manifest.parent, other)
        x, y, s = np.concatenate([x, xo]), np.concatenate([y, yo]), np.concatenate([s, so])
        fit = np.arange(len(y)) < len(c)
        held = ~fit
    x = (x - x[fit].mean(0)) / (x[fit].std(0) + 1e-6)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    lin = torch.nn.Linear(x.shape[1], N_CLASSES)
    opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(500):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(xt[fit]), yt[fit]).backward()
        opt.step()
    with torch.no_grad():
        ok = lin(xt[held]).argmax(1).numpy() == y[held]
    whole = s[held] > 0.99
    print(
        f"digit probe: held-out accuracy {ok.mean():.3f} ({held.sum()} digits), whole digits "
        f"{ok[whole].mean():.3f} ({whole.sum()}), split over patches {ok[~whole].mean():.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
