"""Positional encoding from grid coordinates and the cross-attention aggregator."""

from __future__ import annotations

import math

import torch
from torch import nn


def sincos_encoding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal encoding of grid positions, one block of channels per coordinate axis.

    Args:
        positions: `(..., d)` positions in patch units, d = 2 (row, col) or 3 (z, row, col).
    Returns:
        `(..., dim)`: each axis gets an even block of `dim // d` (rounded down to even) channels,
        half sines, half cosines; leftover channels (when 2*d does not divide dim) are zero.
    """
    d = positions.shape[-1]
    per_axis = (dim // d) // 2 * 2
    if per_axis == 0:
        raise ValueError(f"dim={dim} is too small to encode {d} axes")
    freqs = torch.exp(
        -math.log(10000.0)
        * torch.arange(0, per_axis, 2, device=positions.device, dtype=torch.float32)
        / per_axis
    )  # (per_axis/2,)
    angles = positions.float().unsqueeze(-1) * freqs  # (..., d, per_axis/2)
    enc = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (..., d * per_axis)
    return torch.nn.functional.pad(enc, (0, dim - d * per_axis))


class CrossAttentionAggregator(nn.Module):
    """Multi-head cross-attention of T learnable queries (one per task) over a bag of N embeddings, then an MLP.

    Attention logit of patch i for query t, head h: `l[t,h,i] = <q[t,h], k[h,i]> / sqrt(d_k)`.

    `context_layers` > 0: each patch's *value* adds what that many pre-norm transformer layers make of the
    content of its selected grid neighbours (`context_delta`: e.g. the other patches a digit is split
    across), while the keys, and with them the attention logits and the selection, stay a function of
    each patch alone. The layers start as the identity (zero-initialised residual branches).

    Shapes: `x (B, N, D)`, optional `mask (B, N)` (True = real patch), and with context layers `content
    (B, N, D)` (embeddings without position) and `positions (B, N, d)` -> `z (B, T, D)`, `logits (B, T, H, N)`.
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        n_queries: int,
        d_mlp: int,
        dropout: float = 0.0,
        context_layers: int = 0,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads, self.d_k = n_heads, d_model // n_heads
        self.queries = nn.Parameter(torch.randn(n_queries, d_model) * 0.02)
        self.norm_kv = nn.LayerNorm(d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        # no key bias: it adds the same q.b to every patch's logit, which softmax and top-M ignore (its
        # gradient is pure rounding noise, which Adam would amplify into random steps)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_drop = nn.Dropout(dropout)
        self.context = (
            nn.TransformerEncoder(
                nn.TransformerEncoderLayer(
                    d_model, n_heads, d_mlp, dropout, activation="gelu", batch_first=True, norm_first=True
                ),
                context_layers,
                enable_nested_tensor=False,
            )
            if context_layers
            else None
        )
        if self.context is not None:
            # each layer's residual branches start at zero, so the layers start as the identity and the
            # values are at first exactly those without context: at lr 1e-3 a randomly initialised layer
            # collapsed a Megapixel MNIST run at epoch 7 (docs/BENCHMARKS.md "Sixth look")
            for layer in self.context.layers:
                for out in (layer.self_attn.out_proj, layer.linear2):
                    nn.init.zeros_(out.weight)
                    nn.init.zeros_(out.bias)
        self.norm_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_mlp),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(d_mlp, d_model),
            nn.Dropout(dropout),
        )

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (..., N, D) -> (..., H, N, d_k)
        return x.unflatten(-1, (self.n_heads, self.d_k)).transpose(-3, -2)

    def attention_logits(self, x: torch.Tensor) -> torch.Tensor:
        """`x (B, N, D)` -> logits `(B, T, H, N)`; a function of each patch alone (no softmax)."""
        q = self._heads(self.q_proj(self.queries))  # (H, T, d_k)
        k = self._heads(self.k_proj(self.norm_kv(x)))  # (B, H, N, d_k)
        return torch.einsum("htd,bhnd->bthn", q, k) / math.sqrt(self.d_k)

    def values(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        content: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`x (B, N, D)` (content + position), optional `mask (B, N)` (True = real), `content (B, N, D)`
        (without position) and `positions (B, N, d)` (grid units) -> values `(B, H, N, d_k)`.

        With context layers, each patch's value adds what the layers make of the *content* of its grid
        neighbours (Chebyshev distance <= 1) and itself: local and translation invariant, so the layers can
        join the pieces of a split object but cannot read a bag's layout (absolute positions let them
        recognise and memorise each training bag: docs/BENCHMARKS.md seventh look)."""
        if self.context is not None:
            assert content is not None and positions is not None, "context layers need content and positions"
            x = x + self.context_delta(content, positions, mask)
        return self._heads(self.v_proj(self.norm_kv(x)))

    def context_delta(
        self, content: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What the context layers add to each patch: `content (B, N, D)`, `positions (B, N, d)` (grid units),
        optional `mask (B, N)` -> `(B, N, D)`. Each patch attends to itself and its real grid neighbours
        (Chebyshev distance <= 1); positions enter only through that neighbourhood."""
        assert self.context is not None
        near = (positions[:, :, None, :] - positions[:, None, :, :]).abs().amax(dim=-1) <= 1.0 + 1e-6
        if mask is not None:
            near = near & mask[:, None, :]
        near = near | torch.eye(near.shape[1], dtype=torch.bool, device=near.device)  # never an empty row
        blocked = (~near).repeat_interleave(self.n_heads, dim=0)  # (B * H, N, N), True = not attended
        return self.context(content, mask=blocked) - content

    def combine(self, pooled: torch.Tensor) -> torch.Tensor:
        """Per-head attention-weighted values `(B, T, H, d_k)` -> task embeddings `(B, T, D)`."""
        z = self.out_proj(pooled.flatten(-2))  # (B, T, D)
        return z + self.mlp(self.norm_mlp(z))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        content: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.attention_logits(x)  # (B, T, H, N)
        masked = logits if mask is None else logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        attn = self.attn_drop(masked.softmax(dim=-1))
        values = self.values(x, mask, content, positions)
        pooled = torch.einsum("bthn,bhnd->bthd", attn, values)  # (B, T, H, d_k)
        return self.combine(pooled), logits
