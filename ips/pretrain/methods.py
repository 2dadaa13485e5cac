"""Self-supervised objectives on an encoder `(n, C, *S) -> (n, D)`: SimCLR (NT-Xent) and rotation prediction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss for two views `(n, P)` of n patches: each view's positive is the other view of its
    patch, its negatives the other 2n - 2 views. Scalar."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2n, P)
    sim = z @ z.T / temperature  # (2n, 2n)
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def decorrelation(h: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal correlation between the encoder's output dimensions over a batch `(n, D)`:
    0 when every dimension carries its own information, near 1 when they all move together. Scalar.

    Contrastive learning on a small encoder collapses its output into a few directions (effective rank
    ~5 of 64 here, docs/BENCHMARKS.md), and fine-tuning from such an encoder stalled; this term (as in
    VICReg and Barlow Twins, but on the representation that transfers) keeps the dimensions apart."""
    h = h.float()
    z = (h - h.mean(0)) / (h.std(0) + 1e-4)
    corr = z.T @ z / (h.shape[0] - 1)  # (D, D)
    d = corr.shape[0]
    off = corr - torch.diag(torch.diagonal(corr))
    return (off**2).sum() / (d * (d - 1))


class SimCLRHead(nn.Module):
    """Projection MLP `(n, D) -> (n, P)` (the loss acts on it; the encoder's output is what transfers)."""

    def __init__(self, in_dim: int, proj_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, proj_dim)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class RotationHead(nn.Module):
    """Linear classifier `(n, D) -> (n, 4)`: which quarter turn a patch was given."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.net = nn.Linear(in_dim, 4)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def quarter_turns(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each patch `(n, C, *S)` by k quarter turns in its last two axes, k ~ U{0..3}: (rotated, k)."""
    k = torch.randint(0, 4, (x.shape[0],), generator=gen).to(x.device)
    out = x.clone()
    for turns in (1, 2, 3):
        sel = torch.nonzero(k == turns).squeeze(1)
        if sel.numel():
            out[sel] = torch.rot90(x[sel], turns, dims=(-2, -1))
    return out, k
