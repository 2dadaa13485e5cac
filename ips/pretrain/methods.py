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
