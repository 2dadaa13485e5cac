"""BatchNorm in IPS: re-estimating the running statistics from what the model is trained on.

Training normalises each micro-batch of selected patches by its own statistics; selection, validation and
inference use the running averages, which lag behind the weights (momentum over the last steps) and mix
in the random `explore` patches, so validation metrics can jump from one epoch to the next. Re-estimating
them once per epoch over the top-M selections of a fixed set of training slides (weights fixed, "precise
BatchNorm") removes the jumps; whether it raises final accuracy depends on the data (docs/BENCHMARKS.md,
"Megapixel MNIST at CPU size"), so `ips train` does it only when asked (`train.bn_recalibration_slides`).
Models without BatchNorm are left untouched.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ips.algo.batch import SelectedBatch
from ips.algo.selection import eval_mode

_BatchNorm = nn.modules.batchnorm._BatchNorm


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[SelectedBatch],
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> int:
    """Replace every BatchNorm layer's running mean and variance by their average over `batches`
    (each normalised as one training micro-batch is). Dropout and everything else stay in eval mode;
    parameters are not touched. Returns the number of batches used (0: the model has no BatchNorm)."""
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    n = 0
    with eval_mode(model):
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
            m.train()
        try:
            for batch in batches:
                b = batch.to(device)
                with autocast:
                    model(b.patches, b.positions, b.mask)
                n += 1
        finally:
            for m, momentum in zip(layers, momenta):
                m.momentum = momentum
    return n
