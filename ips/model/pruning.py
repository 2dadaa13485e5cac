"""Structured channel pruning of our CNN encoders (`ConvEncoder`): narrower blocks, same interfaces.

What is pruned: the inner channels of every block (a basic block's middle, an inverted bottleneck's
hidden, a Fire module's squeeze). Each is read by one layer and written by one or two, inside the
block, so narrowing it touches nothing else: the residual streams, the encoder's `out_dim`, the
projection, the aggregator and the heads keep their shapes and weights. A block's 3^d convolutions
cost in proportion to its inner width, so a ratio r saves about r of their MACs.

Which channels go: the least important, a channel's importance being the L1 norm of its filter scaled
by its normalisation (`|gamma| / sqrt(running_var + eps)` for BatchNorm, `|gamma|` for GroupNorm): the
size of what the channel passes on ("network slimming"). Kept channels keep their order, so ratio 0
returns the same function with the same weights. With GroupNorm, a count of 8 or more is rounded to
a multiple of 8 (the groups must divide it); a pruned GroupNorm block mixes statistics over other
channels than before, which fine-tuning absorbs.

The result is an `IPSModel` and the `ModelConfig` that rebuilds it (`encoder_inner` holds the new
widths), so a pruned checkpoint loads like any other.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ips.config import ModelConfig
from ips.errors import ConfigError
from ips.model.encoders import BasicBlock, ConvEncoder, FireBlock, InvertedBottleneck
from ips.model.ips_model import IPSModel, build_model


@dataclasses.dataclass(frozen=True)
class InnerLayout:
    """Where a block's inner channels live: `score` = (conv, norm) whose scaled filters rank them;
    `writes` = modules whose dim 0 is the inner channels; `reads` = convs whose dim 1 is."""

    score: tuple[str, str]
    writes: tuple[str, ...]
    reads: tuple[str, ...]


LAYOUTS: dict[type, InnerLayout] = {
    BasicBlock: InnerLayout(("body.0", "body.1"), ("body.0", "body.1"), ("body.3",)),
    InvertedBottleneck: InnerLayout(
        ("body.3", "body.4"), ("body.0", "body.1", "body.3", "body.4"), ("body.6",)
    ),
    FireBlock: InnerLayout(("squeeze.0", "squeeze.1"), ("squeeze.0", "squeeze.1"), ("e1", "e3")),
}


def encoder_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The blocks of a `ConvEncoder`, in order; ConfigError for an encoder that cannot be pruned."""
    if not isinstance(encoder, ConvEncoder):
        raise ConfigError(
            f"model.encoder: only our ips_* CNN encoders can be channel-pruned, not {type(encoder).__name__}"
        )
    n = sum(encoder.arch["depths"])
    blocks = [encoder.net[encoder.first_block + k] for k in range(n)]
    odd = [type(b).__name__ for b in blocks if type(b) not in LAYOUTS]
    if odd:
        raise ConfigError(f"model.encoder: blocks of type {odd[0]} cannot be pruned yet")
    return blocks


def channel_importance(block: nn.Module) -> torch.Tensor:
    """The inner channels' importance `(C,)`: L1 norm of each normalisation-scaled filter."""
    conv_name, norm_name = LAYOUTS[type(block)].score
    conv, norm = block.get_submodule(conv_name), block.get_submodule(norm_name)
    with torch.no_grad():
        filters = conv.weight.detach().float().flatten(1).abs().sum(dim=1)  # (C,)
        scale = norm.weight.detach().float().abs() if norm.weight is not None else torch.ones_like(filters)
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.running_var is not None:
            scale = scale / torch.sqrt(norm.running_var.float() + norm.eps)
    return filters * scale


def kept_count(channels: int, ratio: float, *, group_norm: bool) -> int:
    """How many of `channels` stay at pruning `ratio` (halves round up); with GroupNorm, 8 or more round
    to the nearest multiple of 8."""
    k = max(1, int(channels * (1.0 - ratio) + 0.5))
    if group_norm and k >= 8:
        k = 8 * int(k / 8 + 0.5)
    return min(k, channels)


def kept_channels(block: nn.Module, ratio: float, *, group_norm: bool) -> torch.Tensor:
    """Indices of the inner channels that stay, most important first chosen, returned in ascending order
    (ties: the lower index). `(K,)` int64."""
    score = channel_importance(block)
    k = kept_count(len(score), ratio, group_norm=group_norm)
    order = sorted(range(len(score)), key=lambda c: (-float(score[c]), c))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def prune_model(model: IPSModel, cfg: ModelConfig, *, ratio: float) -> tuple[IPSModel, ModelConfig]:
    """`model` (built from `cfg`) with each encoder block's inner channels pruned by `ratio` in [0, 1);
    returns the pruned model (same mode and device as `model`'s weights, eval) and its config."""
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"--ratio: must be in [0, 1), got {ratio}")
    encoder = model.encoder
    blocks = encoder_blocks(encoder)
    group_norm = encoder.arch["norm"] == "group"
    keeps = [kept_channels(b, ratio, group_norm=group_norm) for b in blocks]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k, (block, idx) in enumerate(zip(blocks, keeps)):
        prefix = f"encoder.net.{encoder.first_block + k}."
        layout = LAYOUTS[type(block)]
        for key in [s for s in state if s.startswith(prefix)]:
            module = key[len(prefix) :].rpartition(".")[0]
            t = state[key]
            if module in layout.writes and t.ndim >= 1:
                state[key] = t.index_select(0, idx.to(t.device))
            elif module in layout.reads and key.endswith(".weight"):
                state[key] = t.index_select(1, idx.to(t.device))
    new_cfg = dataclasses.replace(cfg, encoder_inner=tuple(len(i) for i in keeps), pretrained=False)
    pruned = build_model(new_cfg)
    pruned.load_state_dict(state)
    device = next(model.parameters()).device
    return pruned.to(device).eval(), new_cfg
