"""B slides' selections stacked into one padded batch `(B, M, ...)`: what training and top-M prediction
run the model on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ips.algo.selection import Selection


@dataclass
class SelectedBatch:
    """B selections stacked and padded to M: patches `(B, M, ...)`, positions `(B, M, d)`,
    mask `(B, M)` (True = real patch), targets `{task: label tensor}` (see ips.model.tasks);
    patch_targets `(B, M)` float: each patch's annotated fraction, NaN where unknown (no annotation,
    padding), or None when no slide of the batch is annotated; bags: per slide, the detached embeddings
    `(n_i, D)` of its whole bag (`ips.training.bagloss`), or None."""

    patches: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    targets: dict[str, torch.Tensor]
    patch_targets: torch.Tensor | None = None
    bags: tuple[torch.Tensor, ...] | None = None

    def __len__(self) -> int:
        return self.patches.shape[0]

    def slice(self, start: int, stop: int) -> SelectedBatch:
        return SelectedBatch(
            self.patches[start:stop],
            self.positions[start:stop],
            self.mask[start:stop],
            {k: v[start:stop] for k, v in self.targets.items()},
            None if self.patch_targets is None else self.patch_targets[start:stop],
            None if self.bags is None else self.bags[start:stop],
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> SelectedBatch:
        return SelectedBatch(
            self.patches.to(device, non_blocking=non_blocking),
            self.positions.to(device, non_blocking=non_blocking),
            self.mask.to(device, non_blocking=non_blocking),
            {k: v.to(device, non_blocking=non_blocking) for k, v in self.targets.items()},
            None if self.patch_targets is None else self.patch_targets.to(device, non_blocking=non_blocking),
            self.bags,  # moved where the loss pads them
        )


def stack_selections(
    selections: Sequence[Selection],
    targets: dict[str, torch.Tensor],
    memory_size: int,
    patch_targets: Sequence[np.ndarray | None] | None = None,
) -> SelectedBatch:
    """Stack B selections into `(B, M, ...)`, padding bags with fewer than M patches (masked out).
    `patch_targets`: per selection, the annotated fraction of each selected patch `(m,)` or None."""
    b = len(selections)
    first = selections[0]
    patches = torch.zeros((b, memory_size, *first.patches.shape[1:]), dtype=first.patches.dtype)
    positions = torch.zeros((b, memory_size, first.positions.shape[1]), dtype=first.positions.dtype)
    mask = torch.zeros((b, memory_size), dtype=torch.bool)
    for i, sel in enumerate(selections):
        m = sel.patches.shape[0]
        patches[i, :m], positions[i, :m], mask[i, :m] = sel.patches, sel.positions, True
    stacked = None
    if patch_targets is not None and any(p is not None for p in patch_targets):
        stacked = torch.full((b, memory_size), float("nan"))
        for i, p in enumerate(patch_targets):
            if p is not None:
                stacked[i, : len(p)] = torch.as_tensor(p, dtype=torch.float32)
    return SelectedBatch(patches, positions, mask, targets, stacked)
