"""Iterative patch selection: stream a bag through the model without gradient and keep the top M.

Memory: the buffer holds M patches (and, for the softmax score, M embeddings) plus one chunk of I:
O(M + I), independent of N. The default `logit` score depends on each patch alone, so the result equals
the global top-M over all N patches for any M, I and patch order (ties broken by lower patch index).

Callers go through one object: `ips.infer.engine.Selector` (built from `cfg.selection` and the runtime)
for training, validation and prediction alike. An `observe` hook sees every chunk's embeddings during
the pass (the attention of every patch for heatmaps, the novelty pool of training's exploration), so
that nothing needs a second pass over the slide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ips.data.sources import Chunk, PatchSource, iter_chunks

StreamFn = Callable[[PatchSource, int], Iterator[Chunk]]
# observe(indices (i,) int64, content (i, D) without position, embeddings (i, D) with position), per chunk
ChunkObserver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def observe_all(*observers: ChunkObserver | None) -> ChunkObserver | None:
    """One observer that calls each of `observers` (None entries skipped); None when there are none."""
    live = [o for o in observers if o is not None]
    if not live:
        return None
    if len(live) == 1:
        return live[0]

    def observe(indices: torch.Tensor, content: torch.Tensor, emb: torch.Tensor) -> None:
        for o in live:
            o(indices, content, emb)

    return observe


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put modules (and all their submodules) in eval mode; restore each submodule's previous mode after."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training


@dataclass
class Selection:
    """The M selected patches of one bag, best first.

    indices `(m,)` int64 into the source; scores `(m,)` float (NaN where the N <= M shortcut skipped
    scoring); patches `(m, *patch_shape)` as read (uint8 stays uint8), on the host; positions `(m, d)`.
    m = min(M, N).
    """

    indices: torch.Tensor
    scores: torch.Tensor
    patches: torch.Tensor
    positions: torch.Tensor


def top_m(scores: torch.Tensor, indices: torch.Tensor, m: int) -> torch.Tensor:
    """Positions of the m best entries, ordered by score descending, ties by lower patch index."""
    by_index = torch.argsort(indices, stable=True)
    by_score = torch.argsort(scores[by_index], descending=True, stable=True)
    return by_index[by_score[:m]]


def softmax_mean_scores(model: nn.Module, emb: torch.Tensor) -> torch.Tensor:
    """The reference implementation's score: mean over tasks and heads of softmax attention over the
    current buffer + chunk. `(n, D)` -> `(n,)`. It depends on which patches share the buffer."""
    logits = model.aggregator.attention_logits(emb[None])[0]  # (T, H, n)
    return logits.softmax(dim=-1).mean(dim=(0, 1))


@torch.no_grad()
def select(
    model: nn.Module,
    source: PatchSource,
    *,
    memory_size: int,
    iter_size: int,
    score: str = "logit",
    device: torch.device | str = "cpu",
    stream: StreamFn = iter_chunks,
    autocast_dtype: torch.dtype | None = None,
    observe: ChunkObserver | None = None,
) -> Selection:
    """Select the `memory_size` most attended patches of `source`, streaming chunks of `iter_size`.

    The model is used as it is: wrap the call in `eval_mode(model)` (`ips.infer.engine.Selector` does).
    `stream(source, iter_size)` yields the chunks (`ips.data.streaming.stream_chunks` adds prefetching).
    `observe` (under the pass's autocast) gets every chunk's indices, content embeddings and embeddings;
    the model then needs `embed_content` and `add_position` (IPSModel has them), and the pass runs even
    when N <= M, so that the observer sees every patch.
    """
    if memory_size < 1 or iter_size < 1:
        raise ValueError(f"memory_size and iter_size must be >= 1, got {memory_size}, {iter_size}")
    if score not in ("logit", "softmax_mean"):
        raise ValueError(f"score must be 'logit' or 'softmax_mean', got {score!r}")
    n = len(source)
    if n == 0:
        raise ValueError("cannot select from an empty bag (the grid has no patches)")
    device = torch.device(device)
    if n <= memory_size and observe is None:  # nothing to choose: take every patch, skip the scoring pass
        idx = np.arange(n, dtype=np.int64)
        return Selection(
            torch.from_numpy(idx),
            torch.full((n,), float("nan")),
            source.read(idx),
            torch.from_numpy(np.ascontiguousarray(source.positions()[idx])),
        )

    buf_idx = torch.empty(0, dtype=torch.long)
    buf_scores = torch.empty(0)
    buf_patches: torch.Tensor | None = None
    buf_pos: torch.Tensor | None = None
    buf_emb: torch.Tensor | None = None  # softmax_mean only
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    for chunk in stream(source, iter_size):
        idx = torch.from_numpy(chunk.indices)
        with autocast:
            x, pos = chunk.patches.to(device, non_blocking=True), chunk.positions.to(device)
            if observe is None:
                emb = model.embed(x, pos)  # (i, D)
            else:
                content = model.embed_content(x)  # (i, D)
                emb = model.add_position(content, pos)
                observe(idx, content, emb)
                del content
        all_idx = torch.cat([buf_idx, idx])
        all_patches = chunk.patches if buf_patches is None else torch.cat([buf_patches, chunk.patches])
        all_pos = chunk.positions if buf_pos is None else torch.cat([buf_pos, chunk.positions])
        if score == "logit":
            with autocast:
                s = model.selection_scores(emb[None])[0].float().cpu()
            all_scores = torch.cat([buf_scores, s])
        else:
            all_emb = emb if buf_emb is None else torch.cat([buf_emb, emb])
            with autocast:
                all_scores = softmax_mean_scores(model, all_emb).float().cpu()
        keep = top_m(all_scores, all_idx, memory_size)
        buf_idx, buf_scores = all_idx[keep], all_scores[keep]
        buf_patches, buf_pos = all_patches[keep], all_pos[keep]
        if score == "softmax_mean":
            buf_emb = all_emb[keep.to(all_emb.device)]
            del all_emb
        # drop references now, so that the next read does not overlap the previous chunk (O(M + I) peak)
        del emb, x, pos, all_patches, all_pos, chunk
    assert buf_patches is not None and buf_pos is not None
    return Selection(buf_idx, buf_scores, buf_patches, buf_pos)


def guide_selection(
    selection: Selection,
    source: PatchSource,
    *,
    candidates: np.ndarray,
    fraction: float,
    generator: np.random.Generator,
) -> Selection:
    """Training on annotated slides: make sure up to `round(fraction * m)` of the M slots hold annotated
    patches (`candidates`, indices into the source). Those already selected count; the rest are drawn
    from the unselected candidates and replace the lowest-scoring unannotated patches."""
    m = selection.indices.numel()
    have = np.isin(selection.indices.numpy(), candidates)
    pool = np.setdiff1d(candidates, selection.indices.numpy())
    k = min(int(round(fraction * m)) - int(have.sum()), len(pool), int((~have).sum()))
    if k <= 0:
        return selection
    drawn = np.sort(generator.choice(pool, size=k, replace=False))
    # keep the annotated ones already selected; drop the k lowest-scoring others
    drop = np.flatnonzero(~have)[-k:]
    keep = np.setdiff1d(np.arange(m), drop)
    kept = Selection(
        selection.indices[keep], selection.scores[keep], selection.patches[keep], selection.positions[keep]
    )
    return replace_lowest(kept, source, drawn, replace=0)


def replace_lowest(
    selection: Selection, source: PatchSource, drawn: np.ndarray, replace: int | None = None
) -> Selection:
    """`selection` without its last `replace` (default: len(drawn)) patches, then the `drawn` patches
    read from `source` (scores NaN: they were not chosen by score)."""
    k = len(drawn) if replace is None else replace
    keep = selection.indices.numel() - k
    return Selection(
        torch.cat([selection.indices[:keep], torch.from_numpy(drawn)]),
        torch.cat([selection.scores[:keep], torch.full((len(drawn),), float("nan"))]),
        torch.cat([selection.patches[:keep], source.read(drawn)]),
        torch.cat(
            [selection.positions[:keep], torch.from_numpy(np.ascontiguousarray(source.positions()[drawn]))]
        ),
    )


def global_top_m(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Reference: indices of the global top-m of `scores (N,)`, ties by lower index."""
    return top_m(scores, torch.arange(scores.numel()), m)
