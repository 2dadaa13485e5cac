"""B slides' selections stacked into one padded batch `(B, M, ...)`: what training and top-M prediction
run the model on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ips.algo.selection import Selection


@dataclass
class SelectedBatch:
    """B selections stacked and padded to M: patches `(B, M, ...)`, positions `(B, M, d)`,
    mask `(B, M)` (True = real patch), targets `{task: label tensor}` (see ips.model.tasks)."""

    patches: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    targets: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return self.patches.shape[0]

    def slice(self, start: int, stop: int) -> SelectedBatch:
        return SelectedBatch(
            self.patches[start:stop],
            self.positions[start:stop],
            self.mask[start:stop],
            {k: v[start:stop] for k, v in self.targets.items()},
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> SelectedBatch:
        return SelectedBatch(
            self.patches.to(device, non_blocking=non_blocking),
            self.positions.to(device, non_blocking=non_blocking),
            self.mask.to(device, non_blocking=non_blocking),
            {k: v.to(device, non_blocking=non_blocking) for k, v in self.targets.items()},
        )


def stack_selections(
    selections: Sequence[Selection], targets: dict[str, torch.Tensor], memory_size: int
) -> SelectedBatch:
    """Stack B selections into `(B, M, ...)`, padding bags with fewer than M patches (masked out)."""
    b = len(selections)
    first = selections[0]
    patches = torch.zeros((b, memory_size, *first.patches.shape[1:]), dtype=first.patches.dtype)
    positions = torch.zeros((b, memory_size, first.positions.shape[1]), dtype=first.positions.dtype)
    mask = torch.zeros((b, memory_size), dtype=torch.bool)
    for i, sel in enumerate(selections):
        m = sel.patches.shape[0]
        patches[i, :m], positions[i, :m], mask[i, :m] = sel.patches, sel.positions, True
    return SelectedBatch(patches, positions, mask, targets)
