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

    Shapes: `x (B, N, D)`, optional `mask (B, N)` (True = real patch) -> `z (B, T, D)`, `logits (B, T, H, N)`.
    """

    def __init__(
        self, *, d_model: int, n_heads: int, n_queries: int, d_mlp: int, dropout: float = 0.0
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

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """`x (B, N, D)` -> values `(B, H, N, d_k)`."""
        return self._heads(self.v_proj(self.norm_kv(x)))

    def combine(self, pooled: torch.Tensor) -> torch.Tensor:
        """Per-head attention-weighted values `(B, T, H, d_k)` -> task embeddings `(B, T, D)`."""
        z = self.out_proj(pooled.flatten(-2))  # (B, T, D)
        return z + self.mlp(self.norm_mlp(z))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.attention_logits(x)  # (B, T, H, N)
        masked = logits if mask is None else logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        attn = self.attn_drop(masked.softmax(dim=-1))
        pooled = torch.einsum("bthn,bhnd->bthd", attn, self.values(x))  # (B, T, H, d_k)
        return self.combine(pooled), logits
