"""Streaming inference over every patch of a slide: exact attention of all N patches and exact whole-bag
aggregation, in one pass of O(I) memory.

Definitions (DESIGN.md, "Heatmaps: exact attention over all N"). For task t, head h and patch i the
aggregator's attention logit is `l[t,h,i]`. Over all N patches of the slide:

- `attention[i, t] = mean_h softmax_i(l[t,h,:])[i] = mean_h exp(l[t,h,i] - lse[t,h])`, where
  `lse[t,h] = log sum_i exp(l[t,h,i])` is a global log-sum-exp: the share of patch i of the attention of
  task t in the whole slide (each column sums to 1);
- `mean_logit[i, t] = mean_h l[t,h,i]`: the raw score, comparable across slides.

The pass streams the grid in chunks of I, keeps the N x T x H logits (O(N) scalars: 250k x 8 floats =
8 MB) and, for the whole-bag prediction, an online softmax per (t, h) as in flash attention: a running
max `m`, a running sum `s = sum exp(l - m)` and a running weighted value sum `acc = sum exp(l - m) v`.
At the end `acc / s` is exactly `softmax(l) @ v` over all N, which `aggregator.combine` and the heads
turn into the prediction from the whole bag.

The top-M prediction (as trained) needs no second scoring pass for the default `logit` selection score:
that score is the mean over tasks and heads of the logits kept here, and streaming top-M equals global
top-M (DESIGN.md), so the M patches are the global top-M of the kept scores; only they are read again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
import torch

from ips.algo.selection import eval_mode, global_top_m, select
from ips.config import ConfigError, ExperimentConfig
from ips.data.sources import Chunk, PatchSource, iter_chunks
from ips.model.ips_model import IPSModel

Mode = Literal["topm", "all"]
StreamFn = Callable[[PatchSource, int], Iterator[Chunk]]


def check_model_fits(source: PatchSource, cfg: ExperimentConfig, where: str) -> None:
    """A store the checkpoint's model cannot read: ConfigError, one line naming `where` and the mismatch
    (2D vs 3D first, in those words; then channels / patch size via `ips.train.check_source_fits_model`)."""
    from ips.data.open import check_source_fits_model

    dims, want = source.spatial_dims, cfg.model.spatial_dims
    if dims != want:
        kind = "volume" if dims == 3 else "slide"
        raise ConfigError(
            f"{where}: a {dims}D {kind} store, but the checkpoint's model is {want}D "
            f"(model.spatial_dims={want})"
        )
    check_source_fits_model(source, cfg, where)


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


@dataclass
class SlideInference:
    """What one streaming pass over a slide yields.

    head_logits `(N, T, H)` float32: attention logits of every patch (indexed like the source);
    lse `(T, H)` float64: their global log-sum-exp over the N patches;
    selected `(m,)` int64: the top-M patch indices (best first) the `topm` prediction used (empty if none);
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

    @property
    def selection_score(self) -> np.ndarray:
        """`(N,)`: the default (`logit`) selection score, mean over tasks and heads of the logits."""
        return self.head_logits.mean(axis=(1, 2))


def global_logsumexp(head_logits: np.ndarray) -> np.ndarray:
    """`(N, T, H)` -> `(T, H)` float64 log-sum-exp over the N patches."""
    x = head_logits.astype(np.float64)
    m = x.max(axis=0)
    return m + np.log(np.exp(x - m[None]).sum(axis=0))


@torch.no_grad()
def stream_slide(
    model: IPSModel,
    source: PatchSource,
    *,
    chunk_size: int,
    aggregate: bool = False,
    device: torch.device | str = "cpu",
    stream: StreamFn = iter_chunks,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, dict[str, torch.Tensor] | None]:
    """One pass over all N patches in chunks of `chunk_size`: the attention logits of every patch and,
    with `aggregate`, the per-task logits `{task: (n_out,)}` of the whole bag (online softmax).

    Returns `(head_logits (N, T, H) float32, logits or None)`. Memory: one chunk of patches and
    embeddings plus O(N) scalars. The model is used as it is: wrap the call in `eval_mode(model)`.
    """
    n = len(source)
    if n == 0:
        raise ValueError("cannot run inference on an empty bag (the grid has no patches)")
    device = torch.device(device)
    t, h = len(model.tasks), model.aggregator.n_heads
    head_logits = np.empty((n, t, h), dtype=np.float32)
    pool = OnlineSoftmaxPool() if aggregate else None
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    for chunk in stream(source, chunk_size):
        with autocast:
            emb = model.embed(
                chunk.patches.to(device, non_blocking=True), chunk.positions.to(device)
            )  # (i, D)
            logits = model.aggregator.attention_logits(emb[None])[0]  # (T, H, i)
            values = model.aggregator.values(emb[None])[0] if pool is not None else None  # (H, i, d_k)
        head_logits[chunk.indices] = logits.float().permute(2, 0, 1).cpu().numpy()
        if pool is not None:
            assert values is not None
            # the softmax statistics in at least fp32 (bf16 sums over 250k patches would drift)
            dtype = torch.promote_types(logits.dtype, torch.float32)
            pool.update(logits.to(dtype), values.to(dtype))
        del emb, logits, values, chunk  # free before the next chunk is read (O(I) peak)
    if pool is None:
        return head_logits, None
    with autocast:
        z = model.aggregator.combine(pool.pooled()[None])  # (1, T, D)
        out = model.heads(z)
    return head_logits, {name: v[0].float().cpu() for name, v in out.items()}


@torch.no_grad()
def predict_selected(
    model: IPSModel,
    source: PatchSource,
    indices: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Per-task logits `{task: (n_out,)}` from the patches at `indices` `(m,)` (read once, m <= M)."""
    device = torch.device(device)
    indices = np.asarray(indices, dtype=np.int64)
    patches = source.read(indices)[None].to(device)  # (1, m, ...)
    positions = torch.from_numpy(np.ascontiguousarray(source.positions()[indices]))[None].to(
        device
    )  # (1, m, d)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits, _ = model(patches, positions)
    return {name: v[0].float().cpu() for name, v in logits.items()}


def infer_slide(
    model: IPSModel,
    source: PatchSource,
    *,
    memory_size: int,
    iter_size: int,
    modes: tuple[Mode, ...] = ("topm",),
    score: str = "logit",
    device: torch.device | str = "cpu",
    stream: StreamFn = iter_chunks,
    autocast_dtype: torch.dtype | None = None,
) -> SlideInference:
    """Attention of every patch plus the predictions of `modes` for one slide (model in eval mode here).

    `topm`: the prediction from the top-`memory_size` patches, as trained (for the `logit` score from the
    same pass; for `softmax_mean` from `ips.selection.select`, as in training). `all`: from all N
    patches by the exact online softmax of the same pass.
    """
    bad = [m for m in modes if m not in ("topm", "all")]
    if bad:
        raise ValueError(f"unknown inference mode {bad[0]!r}; valid modes: topm, all")
    with eval_mode(model):
        head_logits, whole = stream_slide(
            model,
            source,
            chunk_size=iter_size,
            aggregate="all" in modes,
            device=device,
            stream=stream,
            autocast_dtype=autocast_dtype,
        )
        result = SlideInference(head_logits, global_logsumexp(head_logits))
        if whole is not None:
            result.logits["all"] = whole
        if "topm" in modes:
            if score == "logit":
                scores = torch.from_numpy(result.selection_score)
                selected = global_top_m(scores, min(memory_size, result.n_patches)).numpy()
            else:  # the reference's score depends on the buffer: run the selection as trained
                selected = select(
                    model,
                    source,
                    memory_size=memory_size,
                    iter_size=iter_size,
                    score=score,
                    device=device,
                    stream=stream,
                    autocast_dtype=autocast_dtype,
                ).indices.numpy()
            result.selected = selected.astype(np.int64)
            result.logits["topm"] = predict_selected(
                model, source, selected, device=device, autocast_dtype=autocast_dtype
            )
    return result
