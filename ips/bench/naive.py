"""The naive baseline: end-to-end MIL that backpropagates through every patch of the slide.

This is what training CLAM- or MONAI-MILModel-style models end to end amounts to: the bag `(N, C, H, W)`
is loaded whole, every patch is encoded with gradient, attention pools all N embeddings, and backward
runs through all of them. Its memory is O(N) in activations (and the slide's pixels on the host), the
contrast to IPS's O(M + I).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ips.config import TaskConfig
from ips.data.sources import PatchSource
from ips.model.ips_model import IPSModel
from ips.model.tasks import total_loss


def naive_step(
    model: IPSModel,
    source: PatchSource,
    targets: dict[str, torch.Tensor],
    tasks: Sequence[TaskConfig],
    *,
    device: torch.device,
    chunk_size: int,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Forward and backward through all N patches of one slide; gradients accumulate into `.grad`.

    `targets`: `{task: label tensor of one slide}`; `chunk_size` patches go through the encoder at a
    time (it bounds the encoder's workspace, not the saved activations). Returns the loss.
    """
    n = len(source)
    patches = source.read(np.arange(n, dtype=np.int64))  # (N, C, H, W): the whole bag in host memory
    positions = torch.from_numpy(np.ascontiguousarray(source.positions()))  # (N, d)
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    embs = []
    for start in range(0, n, chunk_size):
        p = patches[start : start + chunk_size].to(device, non_blocking=True)
        with autocast:
            embs.append(
                model.embed(p, positions[start : start + chunk_size].to(device))
            )  # (i, D), with graph
    emb = torch.cat(embs)[None]  # (1, N, D)
    del embs
    with autocast:
        z, _ = model.aggregator(emb)  # attention over all N
        logits = model.heads(z)
    loss = total_loss(tasks, logits, {k: v.to(device) for k, v in targets.items()}).sum()
    loss.backward()
    return float(loss.detach())
