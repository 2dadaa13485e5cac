"""Multiply-accumulates of a forward pass, counted with forward hooks on the layers that multiply.

Counted: convolutions (`out elements * in_channels / groups * kernel volume`), linear layers
(`out elements * in_features`), and timm/PyTorch attention's two matrix products where a block runs
them (`2 * tokens^2 * dim` per attention layer, from its input shape). Not counted: norms,
activations, pooling, additions, shifts (they do no multiply-accumulate per weight). Tokens dropped by a
token-pruning encoder are not counted, because the hooks see the shapes that actually run.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn


def _conv_macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    kernel = math.prod(module.kernel_size)
    return output.numel() * (module.in_channels // module.groups) * kernel


def _linear_macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    return output.numel() * module.in_features


def _attention_macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    # q @ k^T and attn @ v: each tokens x tokens x dim per item (the qkv and proj linears count apart)
    x = inputs[0]  # (n, tokens, dim)
    n, tokens = x.shape[0], x.shape[1]
    dim = getattr(module, "attn_dim", None) or module.num_heads * module.head_dim
    return 2 * n * tokens * tokens * dim


def _rules() -> dict[type, object]:
    rules: dict[type, object] = {
        nn.Conv1d: _conv_macs,
        nn.Conv2d: _conv_macs,
        nn.Conv3d: _conv_macs,
        nn.Linear: _linear_macs,
    }
    layers = sys.modules.get("timm.layers")  # not imported: no timm attention can be in the model
    if layers is not None:
        rules[layers.Attention] = _attention_macs
    return rules


def count_macs(module: nn.Module, x: torch.Tensor) -> int:
    """MACs of `module(x)` per item of the batch `x` (no gradient; the module's mode is left as it is)."""
    rules = _rules()
    total = 0

    def hook(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += int(rules[type(layer)](layer, inputs, output))

    handles = [m.register_forward_hook(hook) for m in module.modules() if type(m) in rules]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return total // max(1, x.shape[0])
