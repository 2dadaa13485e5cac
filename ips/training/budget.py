"""The memory budget planner: how many slides fit in one micro-batch under `train.vram_budget_gb`.

On CUDA the cost of a micro-batch of k slides is measured (`torch.cuda.max_memory_allocated` of a probe
selection + forward/backward). Elsewhere it is estimated from the tensors autograd saves for backward
plus parameters, gradients and AdamW state (reported, not enforced).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ips.errors import BudgetError

GB = 1024**3


@dataclass(frozen=True)
class BudgetPlan:
    micro_batch_size: int
    bytes_per_micro_batch: int  # measured or estimated peak for the chosen micro-batch
    bytes_one_slide: int
    budget_bytes: int
    measured: bool  # True on CUDA (measured), False (estimated)

    def describe(self) -> str:
        how = "measured" if self.measured else "estimated"
        return (
            f"memory budget {self.budget_bytes / GB:.2f} GB: micro-batch {self.micro_batch_size} slide(s), "
            f"{how} peak {self.bytes_per_micro_batch / GB:.3f} GB ({self.bytes_one_slide / GB:.3f} GB for one slide)"
        )


def plan_micro_batch(
    cost: Callable[[int], int],
    *,
    budget_bytes: int,
    batch_size: int,
    measured: bool,
    hint: str,
) -> BudgetPlan:
    """Largest micro-batch k <= batch_size with `cost(k) <= budget_bytes`.

    `cost(k)`: peak bytes of one step with k slides. Memory is affine in k (fixed part + k * per slide),
    so two probes predict the rest; the prediction is checked with a probe at the chosen k.
    `hint` names what to lower, for the error when one slide does not fit.
    """
    one = cost(1)
    if one > budget_bytes:
        raise BudgetError(
            f"one slide needs {one / GB:.2f} GB but train.vram_budget_gb is {budget_bytes / GB:.2f} GB: "
            f"lower {hint}, or raise the budget"
        )
    if batch_size == 1:
        return BudgetPlan(1, one, one, budget_bytes, measured)
    two = cost(2)
    per_slide = max(two - one, 1)
    k = int(min(batch_size, 1 + (budget_bytes - one) // per_slide))
    k = max(k, 1)
    peak = cost(k) if k > 2 else (two if k == 2 else one)
    while k > 1 and peak > budget_bytes:  # the affine model was optimistic: step down
        k -= 1
        peak = cost(k)
    return BudgetPlan(k, peak, one, budget_bytes, measured)


def estimate_step_bytes(model: nn.Module, step: Callable[[], torch.Tensor]) -> int:
    """Bytes of one training step without a CUDA allocator to ask: tensors saved for backward by `step()`
    (which returns the loss) plus parameters, gradients and two AdamW moments."""
    seen: set[int] = set()
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            saved += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    model.zero_grad(set_to_none=True)
    del loss
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return saved + 4 * params
