"""The training step core: forward with gradient on B slides' selections, micro-batched.

Micro-batching is exact: each micro-batch contributes `sum(per-slide loss) / B`, so the accumulated
gradient equals the full-batch gradient of the mean loss (for encoders whose output does not depend on
the rest of the batch, e.g. GroupNorm; BatchNorm in train mode breaks this by design).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import nn

from ips.algo.batch import SelectedBatch
from ips.config import TaskConfig
from ips.model.tasks import total_loss
from ips.training.bagloss import bag_loss


def accumulate_gradients(
    model: nn.Module,
    batch: SelectedBatch,
    tasks: Sequence[TaskConfig],
    *,
    micro_batch_size: int,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    no_sync: bool = False,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    normalizer: float | None = None,
    annotation_weight: float = 0.0,
    bag_weight: float = 0.0,
) -> tuple[float, dict[str, torch.Tensor]]:
    """Forward/backward over `batch` in micro-batches; gradients accumulate into `.grad`.

    Returns the mean loss over the batch and the per-task logits `{task: (B, n_out)}` (detached, CPU).
    `transform`: applied to each micro-batch's patches `(b, M, ...)` on the device (augmentation).
    `normalizer`: the loss is `sum(per-slide loss) / normalizer` (default B; under DDP, which averages
    gradients over ranks, the global batch divided by the world size).
    `no_sync` (DDP): skip gradient all-reduce on all but the last micro-batch.
    `annotation_weight`: weight of `annotation_loss` for slides with patch targets (others add nothing).
    `bag_weight`: weight of the whole-bag loss (`ips.training.bagloss.bag_loss`) on the batch's `bags`.
    """
    device = torch.device(device)
    b = len(batch)
    norm = float(normalizer if normalizer is not None else b)
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    total = 0.0
    logits_out: dict[str, list[torch.Tensor]] = {t.name: [] for t in tasks}
    starts = list(range(0, b, micro_batch_size))
    for j, start in enumerate(starts):
        mb = batch.slice(start, start + micro_batch_size).to(device, non_blocking=True)
        if transform is not None:
            mb.patches = transform(mb.patches)
        last = j == len(starts) - 1
        sync_ctx = model.no_sync() if (no_sync and not last and hasattr(model, "no_sync")) else nullcontext()
        with sync_ctx:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits, attn_logits = model(mb.patches, mb.positions, mb.mask)
            loss = total_loss(tasks, logits, mb.targets).sum() / norm
            if annotation_weight and mb.patch_targets is not None:
                loss = (
                    loss
                    + annotation_weight * annotation_loss(attn_logits, mb.patch_targets, mb.mask).sum() / norm
                )
            if bag_weight and mb.bags is not None:
                net = getattr(model, "module", model)  # the IPSModel under DDP
                loss = loss + bag_weight * bag_loss(net, mb.bags, tasks, mb.targets).sum() / norm
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss {loss.item()} in micro-batch starting at slide {start}"
                )
            loss.backward()
        total += loss.item() * norm / b
        for name, value in logits.items():
            logits_out[name].append(value.detach().float().cpu())
    return total, {k: torch.cat(v) for k, v in logits_out.items()}


def annotation_loss(
    attn_logits: torch.Tensor, patch_targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per-slide patch-level guidance `(B,)`: BCE-with-logits between each patch's selection score (the
    attention logit averaged over tasks and heads, `(B, T, H, M)` -> `(B, M)`, the score that selection
    ranks by) and its annotated fraction `(B, M)`, averaged over the slide's annotated patches. Exactly
    0 for a slide without patch targets (all NaN), so unannotated slides train as before."""
    scores = attn_logits.float().mean(dim=(1, 2))  # (B, M)
    valid = torch.isfinite(patch_targets) & mask
    target = torch.where(valid, patch_targets, torch.zeros_like(patch_targets))
    per_patch = nn.functional.binary_cross_entropy_with_logits(scores, target, reduction="none")
    per_patch = torch.where(valid, per_patch, torch.zeros_like(per_patch))
    return per_patch.sum(dim=1) / valid.sum(dim=1).clamp(min=1)
