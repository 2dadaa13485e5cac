"""Training the cascade's coarse scorer with the model (`selection.cascade`).

Per training batch, after selection: on each slide, the full model (eval mode, no gradient) scores the
slide's selected patches (top-M among the candidates, plus the explored slots) and `cascade_explore`
patches drawn uniformly from the whole slide (mostly outside the candidates: what the coarse scorer
would otherwise never learn to rank). The coarse scorer is then fitted to that ranking
(`ips.algo.cascade.distill_loss`) by its own AdamW step. The model's own loss and gradients are
untouched: the scorer follows the model, it does not steer it. For the first
`selection.cascade_warmup_epochs` epochs training (and validation) select by the full pass, so that a
fresh scorer does not hide the patches the model must first learn from.

Cost per slide: `M + cascade_explore` extra patches through the full model and their coarse views
through the scorer.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ips.algo.cascade import CascadeSettings, distill_loss
from ips.algo.selection import Selection, eval_mode
from ips.config import ConfigError, SelectionConfig
from ips.data.coarse import coarse_view
from ips.data.sources import PatchSource
from ips.model.coarse import attach_coarse_scorer
from ips.model.ips_model import IPSModel
from ips.runtime import Runtime


class CascadeDistiller:
    """The coarse scorer's optimiser and the step that teaches it the model's ranking (see module doc).
    `model` gets its scorer here where it has none yet."""

    def __init__(self, model: IPSModel, selection: SelectionConfig, runtime: Runtime) -> None:
        if runtime.dist.enabled:
            raise ConfigError("selection.cascade: not available for multi-process training yet")
        if getattr(model, "coarse_scorer", None) is None:
            try:
                attach_coarse_scorer(model, width=selection.cascade_width)
            except ValueError as e:
                raise ConfigError(f"selection.cascade: {e}") from None
        self.model, self.runtime = model, runtime
        self.factor, self.explore = selection.cascade_factor, selection.cascade_explore
        self.warmup = selection.cascade_warmup_epochs
        self.cascade = CascadeSettings(selection.cascade_candidates, selection.cascade_factor)
        self.optimizer = torch.optim.AdamW(model.coarse_scorer.parameters(), lr=selection.cascade_lr)
        self._views: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def choose_selector(self, trainer: Any, epoch: int) -> None:
        """Set the trainer's selector (and its predictor's) for `epoch`: the full pass during the first
        `selection.cascade_warmup_epochs` (the scorer learns from the model's own top-M meanwhile), the
        cascade after."""
        selector = dataclasses.replace(
            trainer.selector, cascade=None if epoch <= self.warmup else self.cascade
        )
        trainer.selector = trainer.predictor.selector = selector

    def view(self, source: PatchSource) -> PatchSource:
        """The coarse view of `source` (opened once per source)."""
        view = self._views.get(source)
        if view is None:
            try:
                view = coarse_view(source, self.factor)
            except ValueError as e:
                raise ConfigError(f"selection.cascade: {e}") from None
            self._views[source] = view
        return view

    def teacher(
        self, source: PatchSource, selection: Selection, generator: np.random.Generator
    ) -> tuple[np.ndarray, torch.Tensor]:
        """The patches taught on one slide (int64 `(t,)`: the selected ones, then the drawn ones) and
        the model's selection scores of them `(t,)` float32 on the device."""
        chosen = selection.indices.numpy()
        rest = np.setdiff1d(np.arange(len(source)), chosen)
        drawn = np.sort(generator.choice(rest, size=min(self.explore, len(rest)), replace=False))
        indices = np.concatenate([chosen, drawn]).astype(np.int64)
        patches = torch.cat([selection.patches, source.read(drawn)])
        positions = torch.from_numpy(np.ascontiguousarray(source.positions()[indices]))
        dev = self.runtime.device
        with eval_mode(self.model), torch.no_grad(), self.runtime.autocast():
            emb = self.model.embed(patches.to(dev), positions.to(dev))  # (t, D)
            scores = self.model.selection_scores(emb[None])[0].float()
        return indices, scores

    def step(
        self, sources: Sequence[PatchSource], selections: Sequence[Selection], generator: np.random.Generator
    ) -> float:
        """One AdamW step of the scorer on these slides (the mean of their distillation losses); the
        scorer's gradients are cleared after, so the model's optimiser never steps it."""
        scorer = self.model.coarse_scorer
        losses = []
        was_training = scorer.training
        scorer.train()
        for source, sel in zip(sources, selections):
            if len(source) < 2:
                continue
            indices, target = self.teacher(source, sel, generator)
            with self.runtime.autocast():
                student = scorer(self.view(source).read(indices).to(self.runtime.device))  # (t,)
            losses.append(distill_loss(student, target))
        scorer.train(was_training)
        if not losses:
            return 0.0
        loss = torch.stack(losses).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
