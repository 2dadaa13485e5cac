"""The selection cascade: a cheap look at every patch, the full model on the best candidates only.

1. Coarse stage: a small scorer (`ips.model.coarse.CoarseScorer`) scores every patch on a coarse view
   of its pixels (`ips.data.coarse`), streamed in chunks; the K best are kept (streaming top-K of a
   per-patch score: exactly the global top-K, ties by lower patch index). K is a share of N or a count,
   never below `CANDIDATE_FLOOR` x M.
2. Fine stage: exact IPS (`ips.algo.selection.select`) over the candidates alone, read in index order.

Exactness: the result is **equal to IPS restricted to the candidates**: the global top-M by the full
model's selection score among the K candidates, ties by lower patch index, for any M, I and order
(`cascade_select` is tested against a brute-force oracle). It equals full IPS exactly when the
candidates hold the full pass's top-M; `candidate_recall` measures that share.

Memory: one chunk of the coarse view plus K scalars (indices, scores), then the fine pass's O(M + I):
constant in N apart from O(N) scalars, as for the full pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ips.algo.selection import ChunkObserver, Selection, StreamFn, select, top_m
from ips.data.coarse import CoarseView
from ips.data.sources import PatchSource, iter_chunks

CANDIDATE_FLOOR = 4  # K is never below 4 M: the fine stage needs room to choose


@dataclass(frozen=True)
class CascadeSettings:
    """`candidates`: a share of N (<= 1) or a count (> 1); `factor`: the coarse view's downsample."""

    candidates: float = 0.1
    factor: int = 4

    def __post_init__(self) -> None:
        if not self.candidates > 0:
            raise ValueError(f"candidates must be > 0, got {self.candidates}")
        if self.factor < 1:
            raise ValueError(f"factor must be >= 1, got {self.factor}")

    def count(self, n: int, memory_size: int) -> int:
        """K for a bag of `n` patches: the share or count, at least `CANDIDATE_FLOOR * memory_size`,
        at most n."""
        k = math.ceil(self.candidates * n) if self.candidates <= 1 else int(self.candidates)
        return min(n, max(k, CANDIDATE_FLOOR * memory_size))


class SubsetSource:
    """The patches `subset` (int64 `(k,)`, ascending) of `source` as a bag of its own: index j here is
    patch `subset[j]` there (same patches, same positions)."""

    def __init__(self, source: PatchSource, subset: np.ndarray) -> None:
        subset = np.asarray(subset, dtype=np.int64)
        if subset.ndim != 1 or (len(subset) > 1 and np.any(np.diff(subset) <= 0)):
            raise ValueError("subset must be strictly ascending patch indices (k,)")
        self.source, self.subset = source, subset
        self.patch_shape = source.patch_shape
        self.spatial_dims = source.spatial_dims
        self._positions = np.ascontiguousarray(source.positions()[subset])

    def __len__(self) -> int:
        return len(self.subset)

    def positions(self) -> np.ndarray:
        return self._positions

    def read(self, indices: np.ndarray) -> torch.Tensor:
        return self.source.read(self.subset[np.asarray(indices, dtype=np.int64)])


@torch.no_grad()
def coarse_candidates(
    scorer: nn.Module,
    coarse: PatchSource,
    *,
    count: int,
    chunk_size: int,
    device: torch.device | str = "cpu",
    stream: StreamFn = iter_chunks,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The `count` best patches of `coarse` by `scorer` (in eval mode: the caller's job), streamed in
    chunks of `chunk_size`. Returns (indices int64 `(k,)` ascending, their scores float32 `(k,)`)."""
    device = torch.device(device)
    buf_idx = torch.empty(0, dtype=torch.long)
    buf_scores = torch.empty(0)
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    for chunk in stream(coarse, chunk_size):
        with autocast:
            s = scorer(chunk.patches.to(device, non_blocking=True)).float().cpu()  # (i,)
        all_idx = torch.cat([buf_idx, torch.from_numpy(chunk.indices)])
        all_scores = torch.cat([buf_scores, s])
        keep = top_m(all_scores, all_idx, count)
        buf_idx, buf_scores = all_idx[keep], all_scores[keep]
        del chunk
    order = torch.argsort(buf_idx)
    return buf_idx[order].numpy(), buf_scores[order].numpy()


@dataclass(frozen=True)
class CascadeRun:
    """One bag's cascade: the M selected patches (indices into the bag) and the K candidates
    (int64 `(k,)` ascending)."""

    selection: Selection
    candidates: np.ndarray


def cascade_select(
    model: nn.Module,
    source: PatchSource,
    coarse: CoarseView,
    *,
    memory_size: int,
    iter_size: int,
    settings: CascadeSettings,
    score: str = "logit",
    device: torch.device | str = "cpu",
    stream: StreamFn = iter_chunks,
    autocast_dtype: torch.dtype | None = None,
    observe: ChunkObserver | None = None,
    extra: np.ndarray | None = None,
) -> CascadeRun:
    """Select M patches of `source` by the cascade; `coarse`: the same bag's coarse view
    (`ips.data.coarse.coarse_view`), scored by `model.coarse_scorer`.

    The coarse pass streams chunks of `iter_size * coarse.scale` coarse patches (the memory of I full
    patches). `score`, `device`, `stream`, `autocast_dtype`: as `select`, for both passes where they
    apply; `observe` sees the candidates only, with their indices into `source`. The model is used as
    it is: wrap the call in `eval_mode(model)`. `extra`: patch indices the fine pass sees besides the
    coarse candidates (training's exploration beyond them); the candidates are then the union, and the
    result is IPS restricted to that union.
    """
    if len(coarse) != len(source):
        raise ValueError(f"the coarse view has {len(coarse)} patches, the bag {len(source)}")
    scorer = getattr(model, "coarse_scorer", None)
    if scorer is None:
        raise ValueError("the model has no coarse scorer (ips.model.coarse.attach_coarse_scorer)")
    n = len(source)
    k = settings.count(n, memory_size)
    fine = dict(score=score, device=device, stream=stream, autocast_dtype=autocast_dtype)
    if k >= n:  # nothing to prune: the full pass
        sel = select(model, source, memory_size=memory_size, iter_size=iter_size, observe=observe, **fine)
        return CascadeRun(sel, np.arange(n, dtype=np.int64))
    candidates, _ = coarse_candidates(
        scorer,
        coarse,
        count=k,
        chunk_size=iter_size * coarse.scale,
        device=device,
        stream=stream,
        autocast_dtype=autocast_dtype,
    )
    if extra is not None:
        candidates = np.union1d(candidates, np.asarray(extra, dtype=np.int64))
    lookup = torch.from_numpy(candidates)
    inner = observe

    def seen(idx: torch.Tensor, content: torch.Tensor, emb: torch.Tensor) -> None:
        assert inner is not None
        inner(lookup[idx], content, emb)  # indices into the bag, not the subset

    subset = SubsetSource(source, candidates)
    sel = select(
        model,
        subset,
        memory_size=memory_size,
        iter_size=iter_size,
        observe=None if observe is None else seen,
        **fine,
    )
    sel.indices = lookup[sel.indices]
    return CascadeRun(sel, candidates)


def candidate_recall(reference: Sequence[int] | np.ndarray, candidates: Sequence[int] | np.ndarray) -> float:
    """The share of `reference` (the full pass's top-M indices) found among `candidates`; 1.0 for an
    empty reference."""
    ref = np.unique(np.asarray(reference, dtype=np.int64))
    if ref.size == 0:
        return 1.0
    return float(np.isin(ref, np.asarray(candidates, dtype=np.int64)).sum()) / ref.size


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Listwise distillation of a ranking: cross-entropy from softmax(teacher / its spread) to
    log-softmax(student), over one bag's patches (`(n,)` each). Only the order and spacing of the
    teacher's scores matter (shifting or scaling them changes nothing), as for a top-K."""
    t = teacher.detach().float()
    spread = t.std() if t.numel() > 1 else t.new_tensor(1.0)
    target = torch.softmax((t - t.mean()) / spread.clamp_min(1e-6), dim=0)
    return -(target * torch.log_softmax(student.float(), dim=0)).sum()
