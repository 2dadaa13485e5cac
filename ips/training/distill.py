"""Training the cascade's coarse scorer with the model (`selection.cascade`).

Per training batch, after selection: on each slide, the full model (eval mode, no gradient) scores the
slide's selected patches (top-M among the candidates, plus the explored slots) and `cascade_explore`
patches drawn uniformly from the whole slide (mostly outside the candidates: what the coarse scorer
would otherwise never learn to rank). The coarse scorer is then fitted to that ranking
(`ips.algo.cascade.distill_loss`) by its own AdamW step. The model's own loss and gradients are
untouched: the scorer follows the model, it does not steer it. For the first
`selection.cascade_warmup_epochs` epochs training (and validation) select by the full pass, so that a
fresh scorer does not hide the patches the model must first learn from.

After the warm-up, training selects by `ExploringCascade`: the cascade, with `cascade_explore` patches
drawn uniformly from each slide added to the candidates of its fine pass. Training's exploration draws
its novel slots from what the selection pass observes; with the candidates alone it could only show
the model patches the scorer already ranks high, and a scorer taught by a model that has not taken off
yet would keep the informative patches out for good. Validation and prediction run the plain cascade.

Cost per slide: `M + cascade_explore` extra patches through the full model and their coarse views
through the scorer.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ips.algo.cascade import CascadeSettings, distill_loss
from ips.algo.selection import ChunkObserver, Selection, eval_mode
from ips.config import ConfigError, SelectionConfig
from ips.data.coarse import coarse_view
from ips.data.sources import PatchSource
from ips.infer.engine import Selector
from ips.model.coarse import attach_coarse_scorer
from ips.model.ips_model import IPSModel
from ips.runtime import Runtime


@dataclass(frozen=True)
class ExploringCascade:
    """Training's selection pass after the warm-up (see module doc): `selector`'s cascade, its fine pass
    over the coarse candidates plus `draws` patches per slide drawn uniformly with `generator`; the
    result is IPS restricted to that union. `views(source)`: the slide's coarse view. Called and read
    (`memory_size`, `runtime`) as a `Selector` is."""

    selector: Selector
    draws: int
    generator: np.random.Generator
    views: Callable[[PatchSource], PatchSource]

    @property
    def memory_size(self) -> int:
        return self.selector.memory_size

    @property
    def runtime(self) -> Runtime:
        return self.selector.runtime

    def __call__(self, model: Any, source: PatchSource, *, observe: ChunkObserver | None = None) -> Selection:
        s, n = self.selector, len(source)
        if s.cascade is None or n <= s.memory_size:
            return s(model, source, observe=observe)
        extra = self.generator.choice(n, size=min(self.draws, n), replace=False)
        return s.run_cascade(model, source, observe=observe, coarse=self.views(source), extra=extra).selection


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
        """Set the trainer's selectors for `epoch`: the full pass during the first
        `selection.cascade_warmup_epochs` (the scorer learns from the model's own top-M meanwhile); after,
        `ExploringCascade` for training (draws seeded by `trainer.cfg.train.seed` and the epoch, so a
        resumed run draws as an uninterrupted one) and the plain cascade for validation."""
        base = (
            trainer.predictor.selector if isinstance(trainer.selector, ExploringCascade) else trainer.selector
        )
        if epoch <= self.warmup:
            trainer.selector = trainer.predictor.selector = dataclasses.replace(base, cascade=None)
            return
        plain = dataclasses.replace(base, cascade=self.cascade)
        generator = np.random.default_rng([trainer.cfg.train.seed, epoch])
        trainer.predictor.selector = plain
        trainer.selector = ExploringCascade(plain, self.explore, generator, self.view)

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
