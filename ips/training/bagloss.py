"""The whole-bag loss: the aggregator also learns from every patch of the slide, not only the top M.

Top-M training only ever shows the aggregator the patches it already attends to. With a fresh encoder
those are often the wrong ones (the ventricles of a brain, the marks that are not the target), and the
patch that decides the label is then never seen: the run stays at chance. The selection pass embeds
every patch anyway (without gradient); `BagEmbeddings` keeps those embeddings (all of them up to `cap`,
a uniform sample beyond), and `bag_loss` trains the aggregator and heads on the whole bag with the slide
label. The encoder gets no gradient from it (the embeddings are detached), so the memory of the step
stays O(M + cap) per slide whatever N is; what it buys is an attention that ranks the *whole* slide by
what predicts the label, which is exactly what the next selection pass uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ips.algo.selection import top_m
from ips.config import TaskConfig
from ips.model.tasks import total_loss


class BagEmbeddings:
    """A selection-pass observer: the embeddings (with position) of every patch of a bag of `n` patches
    when n <= `cap`, else of a uniform sample of `cap` of them (the patches with the `cap` largest random
    keys drawn from `generator`: streaming top-cap of a per-patch key equals the global one, so the sample
    does not depend on chunking). `embeddings()` -> `(k, D)` float32 on the host, by patch index."""

    def __init__(self, n: int, cap: int, generator: np.random.Generator) -> None:
        if cap < 1:
            raise ValueError(f"cap must be >= 1, got {cap}")
        self.cap = cap
        self.keys = None if n <= cap else torch.from_numpy(generator.random(n))
        self.indices = torch.empty(0, dtype=torch.long)
        self.values: torch.Tensor | None = None

    def __call__(self, indices: torch.Tensor, content: torch.Tensor, emb: torch.Tensor) -> None:
        del content
        emb = emb.detach().float().cpu()
        all_idx = torch.cat([self.indices, indices])
        all_emb = emb if self.values is None else torch.cat([self.values, emb])
        if self.keys is not None and len(all_idx) > self.cap:
            keep = top_m(self.keys[all_idx], all_idx, self.cap)
            all_idx, all_emb = all_idx[keep], all_emb[keep]
        self.indices, self.values = all_idx, all_emb

    def embeddings(self) -> torch.Tensor:
        if self.values is None:
            raise ValueError("the selection pass observed no patch")
        order = torch.argsort(self.indices)
        return self.values[order]


def pad_bags(bags: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """B bags of embeddings `(n_i, D)` -> padded `(B, max n, D)` and mask `(B, max n)` (True = real)."""
    n_max = max(len(b) for b in bags)
    x = bags[0].new_zeros((len(bags), n_max, bags[0].shape[1]))
    mask = torch.zeros((len(bags), n_max), dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)], mask[i, : len(b)] = b, True
    return x, mask


def bag_loss(
    model: nn.Module,
    bags: Sequence[torch.Tensor],
    tasks: Sequence[TaskConfig],
    targets: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Per-slide task loss `(B,)` of the aggregator and heads of `model` (an `IPSModel`) on whole bags of
    detached embeddings (`BagEmbeddings`), with the slides' `targets`."""
    x, mask = pad_bags(bags)
    device = next(model.parameters()).device
    logits, _ = model.pool(x.to(device), mask.to(device))
    return total_loss(tasks, logits, {k: v.to(device) for k, v in targets.items()})
