"""Structured channel pruning of our CNN encoders (`ConvEncoder`): narrower blocks, same interfaces.

Two kinds of channels can go:

- every block's *inner* channels (`ratio`): a basic block's middle, an inverted bottleneck's hidden, a
  Fire module's squeeze. Each is read by one layer and written by one or two, inside the block, so
  narrowing it touches nothing else. A block's 3^d convolutions cost in proportion to its inner width.
- the *stem's* output channels (`stem`), which are stage 1's residual stream: the identity skips of
  stage 1 carry them, so the stem, every stage-1 block's output and every reader of the stream (each
  stage-1 block's input, and stage 2's first block: its input and its projection skip) keep one and
  the same channel index set. Where the stem is a large share of the MACs (a 7^d stem on 3D volumes),
  this is what halves them.

The residual streams of stages 2 on, the encoder's `out_dim`, the projection, the aggregator and the
heads keep their shapes and weights.

Which channels go: the least important, a channel's importance being the L1 norm of its filter scaled
by its normalisation (`|gamma| / sqrt(running_var + eps)` for BatchNorm, `|gamma|` for GroupNorm): the
size of what the channel passes on ("network slimming"); a stream channel sums that over its writers,
each divided by its mean. Kept channels keep their order, so ratio 0 returns the same function with
the same weights. In eval mode with BatchNorm, a pruned model computes exactly what the unpruned one
computes with the dropped channels' norm scale and shift set to 0 (those channels then carry 0). With
GroupNorm, a count of 8 or more is rounded to a multiple of 8 (the groups must divide it); a pruned
GroupNorm layer mixes statistics over other channels than before, which fine-tuning absorbs.

The result is an `IPSModel` and the `ModelConfig` that rebuilds it (`encoder_inner` holds the new inner
widths, `encoder_widths` the stage widths), so a pruned checkpoint loads like any other.
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


def _scaled_l1(filters: list[torch.Tensor], norm: nn.Module) -> torch.Tensor:
    """`(C,)` L1 norm of each output filter of the convolutions' weights `filters` (each `(C_i, ...)`,
    their outputs concatenated), scaled by `norm`'s per-channel gain (`|gamma| / sqrt(running_var +
    eps)` for BatchNorm, `|gamma|` otherwise)."""
    with torch.no_grad():
        l1 = torch.cat([f.detach().float().flatten(1).abs().sum(dim=1) for f in filters])
        scale = norm.weight.detach().float().abs() if norm.weight is not None else torch.ones_like(l1)
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.running_var is not None:
            scale = scale / torch.sqrt(norm.running_var.float() + norm.eps)
    return l1 * scale


def channel_importance(block: nn.Module) -> torch.Tensor:
    """The inner channels' importance `(C,)`: L1 norm of each normalisation-scaled filter."""
    conv_name, norm_name = LAYOUTS[type(block)].score
    return _scaled_l1([block.get_submodule(conv_name).weight], block.get_submodule(norm_name))


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


# The stage-1 stream (the stem's output, carried through stage 1 by identity skips): in each block, the
# (conv, norm) that write it (Fire: its two expands, concatenated, and the norm after them) and the convs
# that read it (dim 1) when the block takes the stream as its input.
STREAM_WRITES: dict[type, tuple[tuple[str, ...], str]] = {
    BasicBlock: (("body.3",), "body.4"),
    InvertedBottleneck: (("body.6",), "body.7"),
    FireBlock: (("e1", "e3"), "post.0"),
}
STREAM_READS: dict[type, tuple[str, ...]] = {
    BasicBlock: ("body.0", "skip.0"),
    InvertedBottleneck: ("body.0",),
    FireBlock: ("squeeze.0",),
}


def stream_blocks(encoder: ConvEncoder) -> tuple[list[nn.Module], nn.Module]:
    """(the blocks of stage 1, the first block of stage 2): the writers and the last reader of the
    stem's channels. ConfigError where the stream cannot be narrowed."""
    blocks = encoder_blocks(encoder)
    depths = encoder.arch["depths"]
    if len(depths) < 2:
        raise ConfigError("--stem: the encoder has one stage; its stream is the output and keeps its width")
    if encoder.arch["block"] == "se":
        raise ConfigError("--stem: squeeze-excitation blocks gate the stream at its full width: not prunable")
    return blocks[: depths[0]], blocks[depths[0]]


def stream_importance(encoder: ConvEncoder) -> torch.Tensor:
    """The stem's output channels' importance `(C,)`: every writer of the stage-1 stream (the stem and
    each stage-1 block's output) scores a channel by its normalisation-scaled filter L1 norm; the scores
    are divided by each writer's mean (writers of different scale count alike) and summed."""
    writers, _ = stream_blocks(encoder)
    parts = [_scaled_l1([encoder.net[0].weight], encoder.net[1])]
    for block in writers:
        convs, norm = STREAM_WRITES[type(block)]
        filters = [block.get_submodule(c).weight for c in convs]
        parts.append(_scaled_l1(filters, block.get_submodule(norm)))
    return sum(p / p.mean().clamp_min(1e-12) for p in parts)


def kept_stream(encoder: ConvEncoder, ratio: float, *, group_norm: bool) -> torch.Tensor:
    """Indices of the stem's output channels that stay, ascending `(K,)` int64. With Fire blocks in
    stage 1 the stream is [1^d expand | 3^d expand] halves and a narrower Fire block splits K the same
    way (K // 2 first), so each half keeps its own most important channels."""
    score = stream_importance(encoder)
    c = len(score)
    k = kept_count(c, ratio, group_norm=group_norm)
    halves = (
        [(0, c // 2, k // 2), (c // 2, c, k - k // 2)] if encoder.arch["block"] == "fire" else [(0, c, k)]
    )
    kept: list[int] = []
    for lo, hi, n in halves:
        order = sorted(range(lo, hi), key=lambda i: (-float(score[i]), i))
        kept += order[:n]
    return torch.tensor(sorted(kept), dtype=torch.long)


@dataclasses.dataclass(frozen=True)
class PrunePlan:
    """Which channels stay: `inner[k]` = block k's inner channels; `stream` = the stem's output channels
    (= stage 1's residual stream), None = all. Each `(K,)` int64, ascending."""

    inner: tuple[torch.Tensor, ...]
    stream: torch.Tensor | None = None


def plan_pruning(encoder: nn.Module, *, ratio: float, stem: float = 0.0) -> PrunePlan:
    """The channels that pruning `encoder` by `ratio` (every block's inner channels) and `stem` (the stem's
    output channels with stage 1's stream) keeps; ConfigError for a ratio out of [0, 1)."""
    for flag, value in (("--ratio", ratio), ("--stem", stem)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{flag}: must be in [0, 1), got {value}")
    blocks = encoder_blocks(encoder)
    group_norm = encoder.arch["norm"] == "group"
    inner = tuple(kept_channels(b, ratio, group_norm=group_norm) for b in blocks)
    stream = kept_stream(encoder, stem, group_norm=group_norm) if stem > 0 else None
    return PrunePlan(inner=inner, stream=stream)


def channel_slices(encoder: ConvEncoder, plan: PrunePlan) -> dict[str, tuple[torch.Tensor | None, ...]]:
    """Per module of `encoder` (its path) the kept indices along dim 0 (outputs: a conv's filters, a
    norm's channels) and dim 1 (a conv's inputs); None = that dim stays whole."""
    slices: dict[str, list[torch.Tensor | None]] = {}

    def keep(path: str, dim: int, idx: torch.Tensor) -> None:
        slices.setdefault(path, [None, None])[dim] = idx

    blocks = encoder_blocks(encoder)
    for k, (block, idx) in enumerate(zip(blocks, plan.inner)):
        layout = LAYOUTS[type(block)]
        for name in layout.writes:
            keep(f"net.{encoder.first_block + k}.{name}", 0, idx)
        for name in layout.reads:
            keep(f"net.{encoder.first_block + k}.{name}", 1, idx)
    if plan.stream is not None:
        writers, reader = stream_blocks(encoder)
        idx, half = plan.stream, encoder.arch["widths"][0] // 2
        keep("net.0", 0, idx)
        keep("net.1", 0, idx)
        for k, block in enumerate([*writers, reader]):
            prefix = f"net.{encoder.first_block + k}."
            for name in STREAM_READS[type(block)]:
                if isinstance(block.get_submodule(name.partition(".")[0]), nn.Sequential):
                    keep(prefix + name, 1, idx)  # a basic block's skip is a conv only where it projects
            if block is reader:
                continue
            convs, norm = STREAM_WRITES[type(block)]
            keep(prefix + norm, 0, idx)
            if len(convs) == 1:
                keep(prefix + convs[0], 0, idx)
            else:  # Fire: the 1^d expand writes the first half of the stream, the 3^d expand the rest
                keep(prefix + convs[0], 0, idx[idx < half])
                keep(prefix + convs[1], 0, idx[idx >= half] - half)
    return {path: tuple(v) for path, v in slices.items()}


def prune_model(
    model: IPSModel, cfg: ModelConfig, *, ratio: float, stem: float = 0.0
) -> tuple[IPSModel, ModelConfig]:
    """`model` (built from `cfg`) with each encoder block's inner channels pruned by `ratio` and the stem's
    output channels (stage 1's stream) by `stem`, both in [0, 1); returns the pruned model (on `model`'s
    device, eval) and its config (`encoder_inner`, and `encoder_widths` where `stem` > 0)."""
    encoder = model.encoder
    plan = plan_pruning(encoder, ratio=ratio, stem=stem)
    slices = channel_slices(encoder, plan)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for key, t in state.items():
        module, _, param = key.removeprefix("encoder.").rpartition(".")
        if not key.startswith("encoder.") or module not in slices or t.ndim == 0:
            continue
        out_idx, in_idx = slices[module]
        if out_idx is not None:
            t = t.index_select(0, out_idx.to(t.device))
        if in_idx is not None and param == "weight" and t.ndim > 2:  # a conv's input channels
            t = t.index_select(1, in_idx.to(t.device))
        state[key] = t
    changes: dict = {"encoder_inner": tuple(len(i) for i in plan.inner), "pretrained": False}
    if plan.stream is not None:
        changes["encoder_widths"] = (len(plan.stream), *encoder.arch["widths"][1:])
    new_cfg = dataclasses.replace(cfg, **changes)
    pruned = build_model(new_cfg)
    pruned.load_state_dict(state)
    device = next(model.parameters()).device
    return pruned.to(device).eval(), new_cfg
