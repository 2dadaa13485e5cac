"""What one inference pass over a slide yields: the exact attention of all N patches and the exact
whole-bag aggregation, gathered during the selection pass itself (O(I) memory beyond the top-M buffer).

Definitions (docs/ARCHITECTURE.md, "exact attention over all N"). For task t, head h and patch i the
aggregator's attention logit is `l[t,h,i]`. Over all N patches of the slide:

- `attention[i, t] = mean_h softmax_i(l[t,h,:])[i] = mean_h exp(l[t,h,i] - lse[t,h])`, where
  `lse[t,h] = log sum_i exp(l[t,h,i])` is a global log-sum-exp: the share of patch i of the attention of
  task t in the whole slide (each column sums to 1);
- `mean_logit[i, t] = mean_h l[t,h,i]`: the raw score, comparable across slides.

`AttentionRecorder` observes the selection pass (`ips.algo.selection.select(observe=...)`): it keeps
the N x T x H logits (O(N) scalars: 250k x 8 floats = 8 MB) and, for the whole-bag prediction, an
online softmax per (t, h) as in flash attention: a running max `m`, a running sum `s = sum exp(l - m)`
and a running weighted value sum `acc = sum exp(l - m) v`. At the end `acc / s` is exactly
`softmax(l) @ v` over all N, which `aggregator.combine` and the heads turn into the prediction from the
whole bag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
import torch

from ips.model.ips_model import IPSModel

Mode = Literal["topm", "all"]
MODES: tuple[Mode, ...] = ("topm", "all")


class OnlineSoftmaxPool:
    """Exact softmax-weighted sum of values over a bag seen chunk by chunk (flash-attention style).

    State per (t, h): running max `m (T, H)`, running sum `s (T, H)` of `exp(l - m)`, running weighted
    value sum `acc (T, H, d_k)`. `update` folds in one chunk; `pooled()` = `softmax(l) @ v` over all
    patches seen, `(T, H, d_k)`, equal (up to rounding) to doing it on the whole bag at once.
    """

    def __init__(self) -> None:
        self.m: torch.Tensor | None = None
        self.s: torch.Tensor | None = None
        self.acc: torch.Tensor | None = None

    def update(self, logits: torch.Tensor, values: torch.Tensor) -> None:
        """logits `(T, H, n)`, values `(H, n, d_k)` of one chunk."""
        chunk_max = logits.amax(dim=-1)  # (T, H)
        m_new = chunk_max if self.m is None else torch.maximum(self.m, chunk_max)
        p = torch.exp(logits - m_new[..., None])  # (T, H, n)
        chunk_sum = p.sum(dim=-1)  # (T, H)
        chunk_acc = torch.einsum("thn,hnd->thd", p, values)  # (T, H, d_k)
        if self.m is None:
            self.s, self.acc = chunk_sum, chunk_acc
        else:
            assert self.s is not None and self.acc is not None
            scale = torch.exp(self.m - m_new)  # rescale what was summed under the old max
            self.s = self.s * scale + chunk_sum
            self.acc = self.acc * scale[..., None] + chunk_acc
        self.m = m_new

    def pooled(self) -> torch.Tensor:
        """`(T, H, d_k)`: the attention-weighted values over everything seen."""
        if self.acc is None or self.s is None:
            raise ValueError("no patches were pooled")
        return self.acc / self.s[..., None]


class AttentionRecorder:
    """A selection-pass observer: the attention logits of every patch, `head_logits (N, T, H)` float32
    indexed like the source, and with `pool` the online softmax of the whole bag (`whole_bag`)."""

    def __init__(self, model: IPSModel, n_patches: int, *, pool: bool = False) -> None:
        self.model = model
        self.head_logits = np.empty((n_patches, len(model.tasks), model.aggregator.n_heads), dtype=np.float32)
        self.pool = OnlineSoftmaxPool() if pool else None

    def __call__(self, indices: torch.Tensor, content: torch.Tensor, emb: torch.Tensor) -> None:
        """One chunk's embeddings `emb (i, D)` (under the pass's autocast)."""
        aggregator = self.model.aggregator
        logits = aggregator.attention_logits(emb[None])[0]  # (T, H, i)
        self.head_logits[indices.numpy()] = logits.float().permute(2, 0, 1).cpu().numpy()
        if self.pool is not None:
            values = aggregator.values(emb[None])[0]  # (H, i, d_k)
            # the softmax statistics in at least fp32 (bf16 sums over 250k patches would drift)
            dtype = torch.promote_types(logits.dtype, torch.float32)
            self.pool.update(logits.to(dtype), values.to(dtype))

    def whole_bag(self, autocast: torch.autocast) -> dict[str, torch.Tensor]:
        """Per-task logits `{task: (n_out,)}` from all N patches (the exact online softmax)."""
        if self.pool is None:
            raise ValueError("the recorder was made without pool=True")
        with autocast:
            z = self.model.aggregator.combine(self.pool.pooled()[None])  # (1, T, D)
            out = self.model.heads(z)
        return {name: v[0].float().cpu() for name, v in out.items()}


@dataclass
class SlideInference:
    """What one inference pass over a slide yields.

    head_logits `(N, T, H)` float32: attention logits of every patch (indexed like the source);
    lse `(T, H)` float64: their global log-sum-exp over the N patches;
    selected `(m,)` int64: the top-M patch indices (best first) the `topm` prediction uses;
    logits: per-task prediction logits `{task: (n_out,)}` by mode (`"topm"`, `"all"`), for the modes run.
    """

    head_logits: np.ndarray
    lse: np.ndarray
    selected: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    logits: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def n_patches(self) -> int:
        return self.head_logits.shape[0]

    @cached_property
    def attention(self) -> np.ndarray:
        """`(N, T)` float32: per task, the mean over heads of each patch's share of the whole slide's attention."""
        return np.exp(self.head_logits.astype(np.float64) - self.lse[None]).mean(axis=2).astype(np.float32)

    @cached_property
    def mean_logit(self) -> np.ndarray:
        """`(N, T)` float32: per task, the mean over heads of the attention logits."""
        return self.head_logits.mean(axis=2)


def global_logsumexp(head_logits: np.ndarray) -> np.ndarray:
    """`(N, T, H)` -> `(T, H)` float64 log-sum-exp over the N patches."""
    x = head_logits.astype(np.float64)
    m = x.max(axis=0)
    return m + np.log(np.exp(x - m[None]).sum(axis=0))
