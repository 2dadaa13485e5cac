"""The IPS model: encoder -> projection + positional encoding -> cross-attention aggregator -> task heads.

Selection and learning are apart: `embed` and `selection_scores` serve the no-grad
streaming selection (`ips.algo.selection`), `forward` trains on the selected patches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ips.config import ModelConfig, TaskConfig
from ips.model.aggregator import CrossAttentionAggregator, sincos_encoding
from ips.model.encoders import build_encoder
from ips.model.tasks import TaskHeads

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class IPSModel(nn.Module):
    """Args are explicit and typed; the device comes from the inputs.

    Shapes: patches `(B, M, V * C, *spatial)` (uint8 or float) or features `(B, M, F)`; positions
    `(B, M, d)`. `views` V > 1: each item stacks V views of its cell in its channels (the patch, then its
    context, `ips.data.context`); the one encoder embeds every view, and their embeddings, concatenated,
    are projected to `d_model`.
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        tasks: Sequence[TaskConfig],
        spatial_dims: int,
        d_model: int,
        n_heads: int,
        d_mlp: int,
        dropout: float = 0.0,
        pos_enc: bool = True,
        pixel_input: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        views: int = 1,
    ) -> None:
        super().__init__()
        if views < 1 or (views > 1 and not pixel_input):
            raise ValueError(f"views must be 1, or > 1 for pixel input; got {views}")
        self.views = views
        self.encoder = encoder
        self.tasks = tuple(tasks)
        self.spatial_dims = spatial_dims
        self.d_model = d_model
        self.pixel_input = pixel_input
        self.use_pos_enc = pos_enc
        # Fixed sincos codes have amplitude 1 per channel, several times the spread of fresh content
        # embeddings: added at full strength, position dominates the attention at initialisation and the
        # selection never finds the informative patches (the demo did not learn with it; docs/BENCHMARKS.md). A
        # learnable scale that starts small lets content lead and position join as it proves useful.
        self.pos_scale = nn.Parameter(torch.tensor(0.1)) if pos_enc else None
        enc_dim = encoder.out_dim
        self.project = (
            nn.Identity() if enc_dim == d_model and not pixel_input else nn.Linear(views * enc_dim, d_model)
        )
        self.aggregator = CrossAttentionAggregator(
            d_model=d_model, n_heads=n_heads, n_queries=len(self.tasks), d_mlp=d_mlp, dropout=dropout
        )
        self.heads = TaskHeads(self.tasks, d_model)
        if pixel_input:
            shape = (1, -1) + (1,) * spatial_dims
            self.register_buffer("pixel_mean", torch.tensor(mean or [0.5]).reshape(shape), persistent=False)
            self.register_buffer("pixel_std", torch.tensor(std or [0.25]).reshape(shape), persistent=False)

    def normalize(self, patches: torch.Tensor) -> torch.Tensor:
        """Patches `(n, C, *S)`, uint8 in [0, 255] or float in [0, 1] -> normalised float; features pass through."""
        if not self.pixel_input:
            return patches if patches.is_floating_point() else patches.float()
        return normalize_pixels(patches, self.pixel_mean, self.pixel_std)

    def embed(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`(n, C, *S)` or `(n, F)` patches, `(n, d)` positions -> embeddings `(n, D)` (with position)."""
        return self.add_position(self.embed_content(patches), positions)

    def embed_content(self, patches: torch.Tensor) -> torch.Tensor:
        """`(n, C, *S)` or `(n, F)` patches -> embeddings `(n, D)` of what they show, without position.

        Without gradients and in eval mode, constant patches (every pixel the same colour: the blank
        canvas of Megapixel MNIST, a slide's background where the mask keeps it) are encoded once per
        distinct colour: the encoder then maps equal inputs to equal outputs, so only the work changes.
        """
        if self.pixel_input and not self.training and not torch.is_grad_enabled():
            return _embed_constants_once(self, patches)
        return self.encode(patches)

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """`(n, V * C, *S)` or `(n, F)` -> projected embeddings `(n, D)`: every view through the encoder in
        one batch `(V * n, C, *S)`, the views' embeddings concatenated `(n, V * E)`, then projected."""
        if self.views == 1:
            return self.project(self.encoder(self.normalize(patches)))
        n = patches.shape[0]
        views = patches.unflatten(1, (self.views, -1)).transpose(0, 1).flatten(0, 1)  # (V * n, C, *S)
        emb = self.encoder(self.normalize(views))  # (V * n, E), view-major
        return self.project(emb.unflatten(0, (self.views, n)).transpose(0, 1).flatten(1))  # (n, V * E)

    def add_position(self, content: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`(n, D)` content embeddings, `(n, d)` positions -> `(n, D)` with the position encoding added."""
        if not self.use_pos_enc:
            return content
        return content + self.pos_scale * sincos_encoding(positions, self.d_model).to(content.dtype)

    def selection_scores(self, emb: torch.Tensor) -> torch.Tensor:
        """The default selection score: mean over tasks and heads of attention logits. `(B, N, D)` -> `(B, N)`.

        It depends on each patch alone, so streaming top-M equals global top-M exactly.
        """
        return self.aggregator.attention_logits(emb).mean(dim=(1, 2))

    def forward(
        self, patches: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Patches `(B, M, ...)`, positions `(B, M, d)`, mask `(B, M)` (True = real, padding False).

        Returns per-task logits `{task: (B, n_out)}` and attention logits `(B, T, H, M)`.
        """
        b, m = patches.shape[:2]
        emb = self.embed(patches.flatten(0, 1), positions.flatten(0, 1)).unflatten(0, (b, m))  # (B, M, D)
        return self.pool(emb, mask)

    def pool(
        self, emb: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Aggregator and heads on embeddings `(B, N, D)` (with position), mask `(B, N)`: per-task logits
        `{task: (B, n_out)}` and attention logits `(B, T, H, N)`."""
        z, attn_logits = self.aggregator(emb, mask)
        return self.heads(z), attn_logits


def _embed_constants_once(model: IPSModel, patches: torch.Tensor) -> torch.Tensor:
    """`model.embed_content` of `(n, C, *S)` patches, each distinct constant patch encoded once. (n, D)."""
    flat = patches.reshape(len(patches), patches.shape[1], -1)  # (n, C, P)
    constant = (flat == flat[:, :, :1]).all(dim=2).all(dim=1)  # (n,): one value per channel
    if int(constant.sum()) < 2:
        return model.encode(patches)
    values = flat[:, :, 0]  # (n, C): a constant patch is its pixel; one representative per value
    _, which, counts = torch.unique(values[constant], dim=0, return_inverse=True, return_counts=True)
    const_idx = torch.nonzero(constant).squeeze(1)
    first = torch.full((len(counts),), len(patches), dtype=torch.long, device=patches.device)
    first = first.scatter_reduce(0, which, const_idx, reduce="amin")  # earliest patch of each value
    todo = torch.cat([torch.nonzero(~constant).squeeze(1), first])
    emb = model.encode(patches[todo])  # (n_varied + n_values, D)
    out = emb.new_empty((len(patches), emb.shape[1]))
    n_varied = len(todo) - len(first)
    out[todo[:n_varied]] = emb[:n_varied]
    out[const_idx] = emb[n_varied:][which]
    return out


def unit_pixels(patches: torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] -> float in [0, 1]; float pixels (already in [0, 1]) pass through."""
    return patches.float() / 255.0 if patches.dtype == torch.uint8 else patches.float()


def normalize_pixels(patches: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The one pixel normalisation: `(unit_pixels(patches) - mean) / std`; mean and std broadcast over
    `(n, C, *S)` (shape `(1, C, 1, ...)`), from `pixel_stats`."""
    return (unit_pixels(patches) - mean) / std


def pixel_stats(encoder: nn.Module, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) to normalise [0, 1] pixels for `encoder`: its timm `pretrained_cfg` where it has one,
    else ImageNet's for RGB and (0.5, 0.25) per channel otherwise. Training, inference and `ips embed`
    all normalise through this one function."""
    pcfg = getattr(encoder, "pretrained_cfg", None) or {}
    if in_chans == 3:
        return tuple(pcfg.get("mean", _IMAGENET_MEAN)), tuple(pcfg.get("std", _IMAGENET_STD))
    return (0.5,) * in_chans, (0.25,) * in_chans


def expected_patch_shape(cfg: ModelConfig, *, features: bool = False, views: int = 1) -> tuple[int, ...]:
    """The shape of one input item the model takes: `(feature_dim,)` for precomputed features, else
    `(views * in_chans, *[patch_size] * spatial_dims)`."""
    if features:
        return (cfg.feature_dim or 0,)
    return (views * cfg.in_chans, *([cfg.patch_size] * cfg.spatial_dims))


def build_model(cfg: ModelConfig, *, views: int = 1) -> IPSModel:
    """The one builder from config; `views`: views per item the data gives (`SourceFactory.views`, from
    `data.context`), each of `cfg.in_chans` channels."""
    encoder = build_encoder(
        cfg.encoder,
        in_chans=cfg.in_chans,
        spatial_dims=cfg.spatial_dims,
        patch_size=cfg.patch_size,
        pretrained=cfg.pretrained,
        feature_dim=cfg.feature_dim,
        d_model=cfg.d_model,
        norm=cfg.encoder_norm,
        inner=cfg.encoder_inner,
        widths=cfg.encoder_widths,
        token_keep=cfg.token_keep,
    )
    pixel_input = cfg.encoder != "features"
    mean, std = pixel_stats(encoder, cfg.in_chans) if pixel_input else (None, None)
    return IPSModel(
        encoder=encoder,
        tasks=cfg.tasks,
        spatial_dims=cfg.spatial_dims,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        d_mlp=cfg.d_mlp,
        dropout=cfg.dropout,
        pos_enc=cfg.pos_enc == "sincos",
        pixel_input=pixel_input,
        mean=mean,
        std=std,
        views=views if pixel_input else 1,
    )
