"""Training's exploration: which patches a training step sees besides the top M.

With a fresh encoder the informative patches can rank consistently last, and top-M alone then never
shows them to the model. `selection.explore` gives a share of the M slots to other patches: a
`selection.explore_novel` share of them drawn among the slide's most *novel* patches (`ips.algo.novelty`,
found by observing the selection pass itself), the rest uniformly. `explore_selections` is the one
function training calls; prediction never explores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ips.algo.novelty import NoveltyReference, reference_indices
from ips.algo.selection import ChunkObserver, Selection, eval_mode, observe_all, replace_lowest, top_m
from ips.config import SelectionConfig
from ips.data.sources import PatchSource
from ips.infer.engine import Selector
from ips.runtime import Runtime

NOVEL_POOL_FACTOR = 4  # a novel slot is drawn among the 4 x (novel slots) most novel unselected patches


def novel_slots(memory_size: int, fraction: float, novel_share: float) -> int:
    """How many of the M slots `explore_selection` fills from the most novel patches."""
    return int(round(novel_share * int(round(fraction * memory_size))))


def novel_pool_size(memory_size: int, fraction: float, novel_share: float) -> int:
    """How many of the most novel patches a `NovelPool` must keep so that, the M selected ones aside,
    `NOVEL_POOL_FACTOR` candidates per novel slot remain (0: no novelty needed)."""
    k = novel_slots(memory_size, fraction, novel_share)
    return memory_size + NOVEL_POOL_FACTOR * k if k > 0 else 0


class NovelPool:
    """A selection-pass observer: the `size` most novel patches seen so far (indices, most novel first,
    and scores), against a reference sample of the bag drawn with `generator` and embedded up front (one
    extra chunk of encoder work). Streaming top-`size` equals the global top-`size`: the score is per
    patch. Memory: the sample's embeddings and `size` indices."""

    def __init__(
        self,
        model: nn.Module,
        source: PatchSource,
        size: int,
        generator: np.random.Generator,
        runtime: Runtime,
    ) -> None:
        ref = reference_indices(len(source), generator)
        with eval_mode(model), torch.no_grad(), runtime.autocast():
            sample = model.embed_content(source.read(ref).to(runtime.device))
        self.reference = NoveltyReference.from_sample(sample)
        self.size = size
        self.indices = torch.empty(0, dtype=torch.long)
        self.scores = torch.empty(0)

    def __call__(self, indices: torch.Tensor, content: torch.Tensor, emb: torch.Tensor) -> None:
        all_idx = torch.cat([self.indices, indices])
        all_scores = torch.cat([self.scores, self.reference.scores(content).cpu()])
        keep = top_m(all_scores, all_idx, self.size)
        self.indices, self.scores = all_idx[keep], all_scores[keep]


def explore_selection(
    selection: Selection,
    source: PatchSource,
    *,
    fraction: float,
    generator: np.random.Generator,
    novel: torch.Tensor | None = None,
    novel_share: float = 0.0,
) -> Selection:
    """Replace the lowest-scoring `round(fraction * m)` selected patches with unselected ones (scores of
    drawn patches are NaN). A `novel_share` of those slots is drawn uniformly among the
    `NOVEL_POOL_FACTOR` x as many most novel unselected patches (`novel` `(p,)`: the bag's most novel
    patch indices, most novel first, from a `NovelPool`), the rest uniformly from all unselected patches."""
    m, n = selection.indices.numel(), len(source)
    chosen = np.zeros(n, dtype=bool)
    chosen[selection.indices.numpy()] = True
    k = min(int(round(fraction * m)), n - int(chosen.sum()))
    if k <= 0:
        return selection
    drawn = np.empty(0, dtype=np.int64)
    k_novel = min(k, int(round(novel_share * k)))
    if k_novel > 0:
        if novel is None:
            raise ValueError("novel_share > 0 needs the bag's most novel patches (novel=, from a NovelPool)")
        pool = novel.numpy()
        candidates = pool[~chosen[pool]][: NOVEL_POOL_FACTOR * k_novel]
        drawn = generator.choice(candidates, size=min(k_novel, len(candidates)), replace=False)
        chosen[drawn] = True
    rest = generator.choice(np.flatnonzero(~chosen), size=k - len(drawn), replace=False)
    return replace_lowest(selection, source, np.sort(np.concatenate([drawn, rest]).astype(np.int64)))


def explore_selections(
    model: nn.Module,
    sources: Sequence[PatchSource],
    selector: Selector,
    selection: SelectionConfig,
    generator: np.random.Generator,
    *,
    observers: Sequence[ChunkObserver | None] | None = None,
) -> list[Selection]:
    """Training's selection of each bag: top-M (`selector`), then `selection.explore` slots, a
    `selection.explore_novel` share of them novel. The novel pool observes the selection pass (only
    where there is a choice, N > M); `generator` draws the reference samples, then the slots.
    `observers`: per source, a further observer of its selection pass (e.g. `BagEmbeddings`), or None."""
    size = novel_pool_size(selection.memory_size, selection.explore, selection.explore_novel)
    selected: list[tuple[Selection, torch.Tensor | None]] = []
    extra = list(observers) if observers is not None else [None] * len(sources)
    for src, observer in zip(sources, extra):
        pool = None
        if size > 0 and len(src) > selector.memory_size:  # N <= M: every patch is selected, none to add
            pool = NovelPool(model, src, size, generator, selector.runtime)
        sel = selector(model, src, observe=observe_all(pool, observer))
        selected.append((sel, None if pool is None else pool.indices))
    if selection.explore <= 0:
        return [sel for sel, _ in selected]
    return [
        explore_selection(
            sel,
            src,
            fraction=selection.explore,
            generator=generator,
            novel=novel,
            novel_share=selection.explore_novel,
        )
        for (sel, novel), src in zip(selected, sources)
    ]
