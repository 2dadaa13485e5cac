"""Token-pruning ViT patch encoders: a small timm VisionTransformer that drops patch tokens in eval mode.

At each pruning stage (before blocks `prune_at`) a keep-score head, a small MLP on each patch token,
ranks the tokens; in eval mode (the no-grad selection pass, inference) only the best
`ceil(keep * tokens)` go on to the later blocks, so those blocks cost about `keep` as much per stage.
The class token always stays, and the embedding is its final state (timm's 'token' pooling).

Training runs every token (train mode never drops), so the backbone learns the plain ViT. The heads
learn *with* the model, from an auxiliary loss: per stage, the KL divergence from the class token's
attention over the patch tokens in the last block (mean over heads: what the embedding draws on) to
the softmax of the head's scores. The heads read detached tokens and the target is detached, so the
auxiliary loss trains the heads alone and leaves the backbone's gradients as they were; its gradient
is injected at the encoder's output (`_with_aux_loss`), so any training loop that backpropagates
through the embeddings trains the heads, with no change to the loop (each backward pass adds the
auxiliary loss of the patches it encoded once: with micro-batches, once per micro-batch).

Exactness: with `keep` 1 nothing is dropped and the forward is timm's `forward_features` +
`forward_head(pre_logits=True)` on the same weights; with `keep` < 1 each patch is still encoded on its
own (the kept tokens depend on that patch alone), so streaming top-M selection stays exact and its
memory stays O(M + I): the encoder holds nothing across calls.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ips.config import ConfigError

# name -> the ViT's size; the token side is chosen from the patch size (`token_size`)
TOKEN_VITS: dict[str, dict[str, Any]] = {
    "ips_vit_tiny": {"embed_dim": 64, "depth": 6, "num_heads": 4, "mlp_ratio": 2.0, "prune_at": (2, 4)},
}
AUX_WEIGHT = 1.0


def token_size(patch_size: int) -> int:
    """The largest of 16, 8, 4, 2, 1 pixels that tiles `patch_size` into at least 8 x 8 tokens."""
    for t in (16, 8, 4, 2, 1):
        if patch_size % t == 0 and patch_size // t >= 8:
            return t
    raise ValueError(f"patch size {patch_size} is too small for a ViT (>= 8 pixels)")


class KeepScore(nn.Module):
    """A token's keep logit: `(n, P, D)` -> `(n, P)`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = max(8, dim // 4)
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens).squeeze(-1)


class TokenPruningViT(nn.Module):
    """A timm ViT (`vit`) with keep-score heads (`keep_heads`, one per stage in `prune_at`).

    Shapes: `(n, in_chans, S, S)` -> `(n, embed_dim)`; `out_dim` = embed_dim.
    """

    def __init__(
        self,
        *,
        in_chans: int,
        patch_size: int,
        embed_dim: int = 64,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        prune_at: tuple[int, ...] = (2, 4),
        keep: float = 1.0,
    ) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        if not all(0 < b < depth for b in prune_at):
            raise ValueError(f"prune_at must name blocks 1..{depth - 1}, got {prune_at}")
        self.vit = VisionTransformer(
            img_size=patch_size,
            patch_size=token_size(patch_size),
            in_chans=in_chans,
            num_classes=0,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            global_pool="token",
        )
        self.prune_at = tuple(prune_at)
        self.keep_heads = nn.ModuleList(KeepScore(embed_dim) for _ in self.prune_at)
        self.keep = keep
        self.out_dim = embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        t = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))  # (n, 1 + P, D)
        learn = self.training and torch.is_grad_enabled()
        scores: list[torch.Tensor] = []
        target = None
        for i, block in enumerate(vit.blocks):
            if i in self.prune_at:
                head = self.keep_heads[self.prune_at.index(i)]
                if learn:
                    scores.append(head(t[:, 1:].detach()))  # (n, P)
                elif not self.training and self.keep < 1.0:
                    t = drop_tokens(t, head(t[:, 1:]), self.keep)
            if learn and i == len(vit.blocks) - 1:
                with torch.no_grad():  # a target: no gradient into the block's weights either
                    target = cls_attention(block, t)
            t = block(t)
        out = vit.forward_head(vit.norm(t), pre_logits=True)  # (n, D): the class token
        if scores and target is not None:
            aux = sum(keep_loss(s, target) for s in scores)
            out = _with_aux_loss(out, AUX_WEIGHT * aux)
        return out


def drop_tokens(tokens: torch.Tensor, scores: torch.Tensor, keep: float) -> torch.Tensor:
    """Keep the class token and the `ceil(keep * P)` best-scored patch tokens, in their original order.
    `(n, 1 + P, D)`, scores `(n, P)` -> `(n, 1 + K, D)`."""
    p = scores.shape[1]
    k = max(1, math.ceil(keep * p))
    idx = scores.topk(k, dim=1).indices.sort(dim=1).values  # (n, K)
    kept = tokens[:, 1:].gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[2]))
    return torch.cat([tokens[:, :1], kept], dim=1)


def cls_attention(block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The class token's attention over the patch tokens in `block` (a timm ViT block), mean over heads,
    renormalised to sum 1. `(n, 1 + P, D)` -> `(n, P)`."""
    attn = block.attn
    n, length, _ = tokens.shape
    qkv = attn.qkv(block.norm1(tokens)).reshape(n, length, 3, attn.num_heads, attn.head_dim)
    q, k = attn.q_norm(qkv[:, :1, 0].transpose(1, 2)), attn.k_norm(qkv[:, :, 1].transpose(1, 2))
    a = torch.softmax((q @ k.transpose(-2, -1)) * attn.scale, dim=-1)  # (n, H, 1, 1 + P)
    a = a[:, :, 0, 1:].mean(dim=1)  # (n, P)
    return a / a.sum(dim=1, keepdim=True).clamp_min(1e-12)


def keep_loss(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(scores)) averaged over patches: 0 when the head ranks as the attention does.
    `(n, P)`, `(n, P)` -> scalar."""
    log_q = torch.log_softmax(scores.float(), dim=1)
    p = target.float()
    return (torch.xlogy(p, p) - p * log_q).sum(dim=1).mean()


class _AuxGradient(torch.autograd.Function):
    """Identity on `out`; backward also hands `aux` the gradient 1, as if `aux` were added to the loss."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, torch.ones((), dtype=torch.float32, device=grad.device)


def _with_aux_loss(out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """`out` unchanged in value; backpropagating through it also backpropagates `aux` (a scalar)."""
    return _AuxGradient.apply(out, aux)


def build_token_vit(name: str, *, in_chans: int, patch_size: int, keep: float) -> TokenPruningViT:
    """One of `TOKEN_VITS` by name, random init (seeded by the caller)."""
    if patch_size < 8:
        raise ConfigError(f"model.patch_size: {patch_size} is too small for {name!r} (>= 8)")
    return TokenPruningViT(in_chans=in_chans, patch_size=patch_size, keep=keep, **TOKEN_VITS[name])
