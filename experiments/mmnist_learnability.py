"""Where Megapixel MNIST learning stalls: three small checks, each of one part of the model on its own.

    python experiments/mmnist_learnability.py aggregator [--lr 1e-3] [--steps 1000]
    python experiments/mmnist_learnability.py encoder    [--lr 1e-3] [--steps 300] [--norm group|batch]
    python experiments/mmnist_learnability.py bags       [--lr 1e-3] [--steps 400] [--norm group|batch]
    python experiments/mmnist_learnability.py contrast

- `aggregator`: the cross-attention aggregator and heads of `configs/megapixel_mnist_cpu.yaml` on bags of
  36 synthetic feature vectors (`model.encoder=features`): 5 hold a fixed random vector per digit class
  (3 of the majority class, 2 others) plus noise, the rest noise only. Ideal features: how fast the
  aggregator learns the bag labels (majority, max, multi-label; `top` needs positions, not given here).
- `encoder`: the config's encoder (`ips_cnn_small`) plus a linear layer, trained with *strong* labels on
  single MNIST digits placed at random in a black 50 x 50 patch; held-out accuracy (1000 digits).
- `bags`: encoder and aggregator end to end with *bag* labels only, on bags of 36 patches of 50 px of which
  5 hold one whole digit each (no digit split across patches, no noise strokes): Megapixel MNIST made
  as easy as it gets for the encoder, and no selection (every patch is trained on).
- `contrast`: at initialisation, how far a digit patch's encoder output lies from a blank patch's, relative
  to the blank output's norm, for GroupNorm and BatchNorm (a batch of 576 patches, 80 with a digit, as
  one step of `bags`). What the aggregator and the gradient have to start from.

`--norm` sets `model.encoder_norm` ('group', the default of our encoders, or 'batch').

Reads MNIST from `$IPS_TEST_DATA/mnist_5k.csv.gz` (or --mnist). One torch thread. Figures: docs/notes/2026-12-training-log.md (Megapixel MNIST).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from ips.config import load_config
from ips.model.encoders import build_encoder
from ips.model.ips_model import build_model, normalize_pixels, pixel_stats
from ips.model.tasks import total_loss
from ips.synthetic.megapixel_mnist import load_mnist_csv

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "megapixel_mnist_cpu.yaml"
N_PATCHES = 36
PATCH = 50
TASKS = ("majority", "max", "top", "multilabel")


def bag_digits(rng: np.random.Generator) -> list[int]:
    """3 of a majority class and 2 distinct other classes."""
    m = int(rng.integers(10))
    return [m, m, m, *(int(c) for c in rng.choice([c for c in range(10) if c != m], 2, replace=False))]


def bag_labels(digits: list[int], slots: np.ndarray) -> dict[str, np.ndarray | int]:
    multi = np.zeros(10, np.float32)
    multi[digits] = 1
    return {
        "majority": digits[0],
        "max": max(digits),
        "top": digits[int(np.argmin(slots))],
        "multilabel": multi,
    }


def stack(bags: list[tuple[np.ndarray, dict]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = torch.from_numpy(np.stack([b[0] for b in bags]))
    return x, {k: torch.tensor(np.stack([b[1][k] for b in bags])) for k in TASKS}


def accuracies(logits: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> dict[str, float]:
    acc = {k: (logits[k].argmax(1) == y[k]).float().mean().item() for k in ("majority", "max", "top")}
    acc["multilabel"] = ((logits["multilabel"] > 0).float() == y["multilabel"]).float().mean().item()
    return {k: round(v, 2) for k, v in acc.items()}


def train_bags(make_bag, overrides: list[str], lr: float, steps: int, every: int) -> None:
    """AdamW (weight decay 0.05), batch 16, gradient clip 1, as `ips train` with the config."""
    cfg = load_config(CONFIG, ["model.pos_enc=none", "model.encoder_norm=null", *overrides])
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    xv, yv = stack([make_bag() for _ in range(64)])
    t = time.time()
    for step in range(steps + 1):
        x, y = stack([make_bag() for _ in range(16)])
        logits, _ = model(x, torch.zeros(len(x), N_PATCHES, 2))
        loss = total_loss(cfg.model.tasks, logits, y).mean()
        opt.zero_grad()
        loss.backward()
        # gradient norms before clipping: the encoder's against the rest's (where the signal stops)
        g_enc = grad_norm(p for n, p in model.named_parameters() if n.startswith("encoder."))
        g_rest = grad_norm(p for n, p in model.named_parameters() if not n.startswith("encoder."))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % every == 0:
            model.eval()
            with torch.no_grad():
                acc = accuracies(model(xv, torch.zeros(len(xv), N_PATCHES, 2))[0], yv)
            model.train()
            print(
                f"step {step}: loss {loss.item():.3f}, gradient norm encoder {g_enc:.3g} / rest {g_rest:.3g}, "
                f"held-out accuracy {acc} ({time.time() - t:.0f} s)",
                flush=True,
            )


def normalised(enc: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """uint8 patches `(n, 1, H, W)` -> the encoder's input, as `IPSModel.normalize` makes it."""
    mean, std = (torch.tensor(v).reshape(1, -1, 1, 1) for v in pixel_stats(enc, 1))
    return normalize_pixels(x, mean, std)


def grad_norm(params) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("check", choices=("aggregator", "encoder", "bags", "contrast"))
    ap.add_argument("--norm", choices=("group", "batch"), default="group")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument(
        "--mnist", default=os.path.join(os.environ.get("IPS_TEST_DATA", "../shared/data"), "mnist_5k.csv.gz")
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    if args.check == "aggregator":
        protos = rng.normal(size=(10, 64)).astype(np.float32)

        def feature_bag() -> tuple[np.ndarray, dict]:
            digits = bag_digits(rng)
            slots = rng.choice(N_PATCHES, 5, replace=False)
            x = (rng.normal(size=(N_PATCHES, 64)) * 0.5).astype(np.float32)
            x[slots] += protos[digits]
            return x, bag_labels(digits, slots)

        train_bags(
            feature_bag, ["model.encoder=features", "model.feature_dim=64"], args.lr, args.steps or 1000, 100
        )
        return

    images, labels = load_mnist_csv(args.mnist)

    def patch_with(index: int) -> np.ndarray:
        out = np.zeros((1, PATCH, PATCH), np.uint8)
        r, c = rng.integers(0, PATCH - 28 + 1, 2)
        out[0, r : r + 28, c : c + 28] = images[index]
        return out

    if args.check == "encoder":
        cfg = load_config(CONFIG)
        enc = build_encoder(cfg.model.encoder, in_chans=1, spatial_dims=2, patch_size=PATCH, norm=args.norm)
        head = torch.nn.Linear(enc.out_dim, 10)
        opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.05)
        order = np.random.default_rng(1).permutation(len(labels))  # the CSV is sorted by class
        train, test = order[:4000], order[4000:]
        x_test = torch.from_numpy(np.stack([patch_with(i) for i in test]))

        t = time.time()
        for step in range((args.steps or 300) + 1):
            idx = rng.choice(train, 64)
            x = torch.from_numpy(np.stack([patch_with(i) for i in idx]))
            loss = torch.nn.functional.cross_entropy(
                head(enc(normalised(enc, x))), torch.from_numpy(labels[idx])
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0:
                with torch.no_grad():
                    acc = (head(enc(normalised(enc, x_test))).argmax(1).numpy() == labels[test]).mean()
                print(
                    f"step {step}: loss {loss.item():.3f}, held-out accuracy {acc:.3f} ({time.time() - t:.0f} s)",
                    flush=True,
                )
        return

    if args.check == "contrast":
        x = np.zeros((576, 1, PATCH, PATCH), np.uint8)
        is_digit = np.zeros(len(x), bool)
        is_digit[rng.choice(len(x), 80, replace=False)] = True
        for i in np.flatnonzero(is_digit):
            x[i] = patch_with(int(rng.integers(len(labels))))
        for norm in ("group", "batch"):
            torch.manual_seed(args.seed)
            enc = build_encoder(
                load_config(CONFIG).model.encoder, in_chans=1, spatial_dims=2, patch_size=PATCH, norm=norm
            )
            with torch.no_grad():  # train mode: BatchNorm normalises over this batch, as in a training step
                f = enc(normalised(enc, torch.from_numpy(x)))
            blank, digit = f[~is_digit], f[is_digit]
            contrast = (digit - blank.mean(0)).norm(dim=1).mean() / blank.mean(0).norm()
            spread = (digit - digit.mean(0)).norm(dim=1).mean() / blank.mean(0).norm()
            print(
                f"{norm}: digit-to-blank distance / blank norm {contrast:.3f}, digit spread / blank norm "
                f"{spread:.3f}, blank outputs all equal to {(blank - blank.mean(0)).abs().max():.1e}"
            )
        return

    by_class = [np.flatnonzero(labels == c) for c in range(10)]

    def pixel_bag() -> tuple[np.ndarray, dict]:
        digits = bag_digits(rng)
        slots = rng.choice(N_PATCHES, 5, replace=False)
        x = np.zeros((N_PATCHES, 1, PATCH, PATCH), np.uint8)
        for s, d in zip(slots, digits):
            x[s] = patch_with(int(rng.choice(by_class[d])))
        return x, bag_labels(digits, slots)

    train_bags(pixel_bag, [f"model.encoder_norm={args.norm}"], args.lr, args.steps or 400, 50)


if __name__ == "__main__":
    main()
