"""How well can the encoder learn the target *with* patch labels? A supervised upper bound for MIL.

Trains the encoder of a config (plus a linear head) on the per-patch truth of a synthetic family's
stores (`ips_truth/lesion` share >= `--min-share` = positive), batches of 16 positive and 48 negative
patches drawn from the train split, no augmentation; prints the AUROC on the val split's patches (those
with share >= min-share against those the target does not touch) every 100 steps. If even this stays
low, bag labels cannot do better: the encoder's sample efficiency, not the selection, is the limit.

    python experiments/probe_patch_supervised.py DATA [--norm batch|group] [--pretrained ENCODER.pt]

DATA: a family's data folder (`ips bench learn --out OUT` leaves it in OUT/<family>_seed<s>/data).
Default model: the brain family's CPU setting (ips_cnn_small, 1 channel, 3D, 16-voxel patches).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
import zarr

from ips.config import ModelConfig, TaskConfig
from ips.data.zarr_source import ZarrPatchSource
from ips.model.ips_model import build_model
from ips.model.metrics import auroc
from ips.synthetic import truth_key


def load_split(root: Path, split: str) -> tuple[torch.Tensor, np.ndarray]:
    """Every patch of the split's stores `(n, C, *P)` and its target share `(n,)`."""
    patches, shares = [], []
    with (root / "manifest.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            if row["split"].strip() != split:
                continue
            store = root / row["path"].strip()
            src = ZarrPatchSource(str(store))
            patches.append(src.read(np.arange(len(src))))
            shares.append(np.asarray(zarr.open_group(str(store), mode="r")[truth_key("lesion")][...]))
    return torch.cat(patches), np.concatenate(shares)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument(
        "--norm", choices=("batch", "group"), default=None, help="encoder_norm (default: the library's)"
    )
    p.add_argument("--pretrained", default=False, help="an `ips pretrain` encoder.pt")
    p.add_argument("--encoder", default="ips_cnn_small")
    p.add_argument("--spatial-dims", type=int, default=3)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--min-share", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    x_tr, s_tr = load_split(args.data, "train")
    x_va, s_va = load_split(args.data, "val")
    y_tr = torch.tensor(s_tr >= args.min_share, dtype=torch.float32)
    print(f"train patches {len(x_tr)}, positive {int(y_tr.sum())}; val patches {len(x_va)}", flush=True)
    cfg = ModelConfig(
        encoder=args.encoder,
        in_chans=args.in_chans,
        spatial_dims=args.spatial_dims,
        patch_size=args.patch_size,
        d_model=64,
        n_heads=4,
        d_mlp=128,
        encoder_norm=args.norm,
        pretrained=args.pretrained,
        tasks=(TaskConfig(name="label", kind="binary"),),
    )
    model, head = build_model(cfg), torch.nn.Linear(64, 1)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=5e-4, weight_decay=0.01)
    pos, neg = torch.nonzero(y_tr).squeeze(1), torch.nonzero(y_tr == 0).squeeze(1)
    g = torch.Generator().manual_seed(args.seed)
    keep = (s_va >= args.min_share) | (s_va == 0)
    for step in range(1, args.steps + 1):
        idx = torch.cat(
            [
                pos[torch.randint(len(pos), (16,), generator=g)],
                neg[torch.randint(len(neg), (48,), generator=g)],
            ]
        )
        model.train(), head.train()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            head(model.embed_content(x_tr[idx])).squeeze(1), y_tr[idx]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            model.eval(), head.eval()
            with torch.no_grad():
                scores = torch.cat(
                    [
                        head(model.embed_content(x_va[i : i + 256])).squeeze(1)
                        for i in range(0, len(x_va), 256)
                    ]
                ).numpy()
            print(f"step {step}: loss {loss.item():.3f}, val patch AUROC "
                  f"{auroc(scores[keep], s_va[keep] >= args.min_share):.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
