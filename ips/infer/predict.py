"""Top-M prediction over slides, as trained: one selection per slide, then the model on the selection.
Training's validation and `ips predict` share this one path, so they report the same numbers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from ips.algo.batch import stack_selections
from ips.algo.selection import Selection, eval_mode, select
from ips.config import ExperimentConfig
from ips.data.manifest import SlideRecord
from ips.data.open import make_source
from ips.data.sources import PatchSource
from ips.data.streaming import stream_chunks
from ips.model import IPSModel
from ips.runtime import Runtime


def select_slides(
    model: IPSModel,
    sources: Sequence[PatchSource],
    cfg: ExperimentConfig,
    rt: Runtime,
    *,
    novel_pool: int = 0,
    generator: np.random.Generator | None = None,
    novelty: Sequence[Callable[[torch.Tensor], Any]] | None = None,
) -> list[Selection]:
    """One no-grad selection pass per slide, the model in eval mode (restored after); `novel_pool`,
    `generator` and (one per slide) `novelty` as in `ips.algo.selection.select` (training exploration)."""
    stream = partial(stream_chunks, prefetch=cfg.selection.prefetch, pin_memory=rt.device.type == "cuda")
    with eval_mode(model):
        return [
            select(
                model,
                src,
                memory_size=cfg.selection.memory_size,
                iter_size=cfg.selection.iter_size,
                score=cfg.selection.score,
                device=rt.device,
                stream=stream,
                autocast_dtype=rt.autocast_dtype,
                novel_pool=novel_pool,
                generator=generator,
                novelty=None if novelty is None else novelty[k],
            )
            for k, src in enumerate(sources)
        ]


@torch.no_grad()
def predict_records(
    model: IPSModel,
    records: Sequence[SlideRecord],
    cfg: ExperimentConfig,
    rt: Runtime,
    progress: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-task logits `{task: (S, n_out)}` of the slides, from their top-M selection (as trained)."""
    out: dict[str, list[torch.Tensor]] = {t.name: [] for t in cfg.model.tasks}
    with eval_mode(model):
        for record in records:
            source = make_source(record, cfg)
            (sel,) = select_slides(model, [source], cfg, rt)
            batch = stack_selections([sel], {}, cfg.selection.memory_size).to(rt.device)
            with torch.autocast(
                rt.device.type, dtype=rt.autocast_dtype, enabled=rt.autocast_dtype is not None
            ):
                logits, _ = model(batch.patches, batch.positions, batch.mask)
            for name, value in logits.items():
                out[name].append(value.float().cpu())
            if progress:
                progress(1)
    return {k: torch.cat(v) for k, v in out.items()}
