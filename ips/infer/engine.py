"""The one inference engine: a `Selector` (streaming top-M selection as configured) and a `Predictor`
(the model on each slide's top-M selection, as trained), each built once from the config.

Training selects through `Selector` (its exploration observes the same pass, `ips.training.explore`);
training's validation, `ips predict`, `ips heatmap` and `ips demo` predict through `Predictor`, so they
report the same numbers for the same slides. This is the one module that calls
`ips.algo.selection.select`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ips.algo.batch import stack_selections
from ips.algo.cascade import CascadeRun, CascadeSettings, cascade_select
from ips.algo.selection import ChunkObserver, Selection, StreamFn, eval_mode, observe_all, select
from ips.config import ConfigError, ExperimentConfig, ModelConfig, SelectionConfig
from ips.data.coarse import coarse_view
from ips.data.manifest import SlideRecord
from ips.data.open import SourceFactory
from ips.data.sources import PatchSource
from ips.data.streaming import stream_chunks
from ips.infer.slide import MODES, AttentionRecorder, Mode, SlideInference, global_logsumexp
from ips.model.ips_model import IPSModel, expected_patch_shape
from ips.runtime import Runtime, autocast_dtype_for


@dataclass(frozen=True)
class Selector:
    """Streaming top-M selection (`ips.algo.selection.select`) as configured: M, I, the score, the
    prefetch depth, and the runtime's device and precision. Call it on a model and a source.

    `stream`: how chunks are read (default: `stream_chunks` with `prefetch` chunks read ahead, pinned on
    CUDA); tests and benchmarks pass another order or `iter_chunks`.
    `cascade` (`selection.cascade`): select by the cascade (`ips.algo.cascade`): the model's coarse
    scorer on a coarse view of every patch, then exact top-M among the candidates; None: the full pass.
    """

    memory_size: int
    iter_size: int
    score: str = "logit"
    prefetch: int = 2
    runtime: Runtime = field(default_factory=lambda: Runtime(torch.device("cpu")))
    stream: StreamFn | None = None
    cascade: CascadeSettings | None = None

    @classmethod
    def from_config(cls, selection: SelectionConfig, runtime: Runtime) -> Selector:
        """From `cfg.selection` (memory_size, iter_size, score, prefetch, cascade) and the run's runtime."""
        cascade = (
            CascadeSettings(selection.cascade_candidates, selection.cascade_factor)
            if selection.cascade
            else None
        )
        return cls(
            selection.memory_size,
            selection.iter_size,
            score=selection.score,
            prefetch=selection.prefetch,
            runtime=runtime,
            cascade=cascade,
        )

    def __call__(
        self, model: nn.Module, source: PatchSource, *, observe: ChunkObserver | None = None
    ) -> Selection:
        """One no-grad selection pass over `source`, the model in eval mode (each module's mode restored
        after). `observe`: see `ips.algo.selection.select` (under the cascade it sees the candidates)."""
        if self.cascade is not None and len(source) > self.memory_size:
            return self.run_cascade(model, source, observe=observe).selection
        with eval_mode(model):
            return select(
                model,
                source,
                memory_size=self.memory_size,
                iter_size=self.iter_size,
                score=self.score,
                device=self.runtime.device,
                stream=self.chunk_stream(),
                autocast_dtype=self.runtime.autocast_dtype,
                observe=observe,
            )

    def chunk_stream(self) -> StreamFn:
        """How this selector reads chunks: `stream`, or `stream_chunks` with `prefetch` read ahead."""
        return self.stream or partial(
            stream_chunks, prefetch=self.prefetch, pin_memory=self.runtime.pin_memory
        )

    def run_cascade(
        self,
        model: nn.Module,
        source: PatchSource,
        *,
        observe: ChunkObserver | None = None,
        coarse: PatchSource | None = None,
        extra: np.ndarray | None = None,
    ) -> CascadeRun:
        """One cascade pass (`ips.algo.cascade.cascade_select`): the selection and its candidates.
        `coarse`: the source's coarse view where the caller keeps one open (default: opened here);
        `extra`: patch indices the fine pass sees besides the candidates (`cascade_select`).
        ConfigError when the model has no coarse scorer or the source no pixels."""
        settings = self.cascade or CascadeSettings()
        if getattr(model, "coarse_scorer", None) is None:
            raise ConfigError(
                "selection.cascade: this model has no trained coarse scorer (train with selection.cascade=true)"
            )
        if coarse is None:
            try:
                coarse = coarse_view(source, settings.factor)
            except ValueError as e:
                raise ConfigError(f"selection.cascade: {e}") from None
        with eval_mode(model):
            return cascade_select(
                model,
                source,
                coarse,
                memory_size=self.memory_size,
                iter_size=self.iter_size,
                settings=settings,
                score=self.score,
                device=self.runtime.device,
                stream=self.chunk_stream(),
                autocast_dtype=self.runtime.autocast_dtype,
                observe=observe,
                extra=extra,
            )


class Predictor:
    """Top-M prediction, as trained: per slide one selection pass, then the model on the M selected
    patches (padded and masked like a training batch of one). Built once per model."""

    def __init__(self, model: IPSModel, selector: Selector) -> None:
        self.model = model
        self.selector = selector

    @classmethod
    def from_config(cls, model: IPSModel, selection: SelectionConfig, runtime: Runtime) -> Predictor:
        return cls(model, Selector.from_config(selection, runtime))

    @property
    def runtime(self) -> Runtime:
        return self.selector.runtime

    @torch.no_grad()
    def predict(self, source: PatchSource) -> dict[str, torch.Tensor]:
        """Per-task logits `{task: (n_out,)}` float32 on the host, from the slide's top-M selection."""
        with eval_mode(self.model):
            return self._forward(self.selector(self.model, source))

    def predict_sources(
        self, sources: Iterable[PatchSource], progress: Callable[[int], None] | None = None
    ) -> dict[str, torch.Tensor]:
        """`predict` over slides: per-task logits `{task: (S, n_out)}`, in the order of `sources`."""
        out: dict[str, list[torch.Tensor]] = {t.name: [] for t in self.model.tasks}
        for source in sources:
            for name, value in self.predict(source).items():
                out[name].append(value)
            if progress:
                progress(1)
        return {k: torch.stack(v) if v else torch.empty(0) for k, v in out.items()}

    @torch.no_grad()
    def infer(
        self, source: PatchSource, *, modes: Sequence[Mode] = ("topm",), observe: ChunkObserver | None = None
    ) -> SlideInference:
        """The attention of every patch plus the predictions of `modes`, from one pass over the slide.

        `topm`: from the top-M selection, exactly as `predict` without the cascade; `all`: from all N
        patches by the exact online softmax of the same pass. The top-M indices are always kept
        (`selected`). The attention of every patch needs every patch: this is always the full pass.
        `observe`: also sees every chunk of the pass, after the attention is recorded (e.g. `ips suggest`'s
        embeddings).
        """
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown inference mode {bad[0]!r}; valid modes: {', '.join(MODES)}")
        recorder = AttentionRecorder(self.model, len(source), pool="all" in modes)
        full = dataclasses.replace(self.selector, cascade=None)  # every patch's attention: the full pass
        with eval_mode(self.model):
            sel = full(self.model, source, observe=observe_all(recorder, observe))
            result = SlideInference(
                recorder.head_logits, global_logsumexp(recorder.head_logits), sel.indices.numpy()
            )
            if "topm" in modes:
                result.logits["topm"] = self._forward(sel)
            if "all" in modes:
                result.logits["all"] = recorder.whole_bag(self.runtime.autocast())
        return result

    def _forward(self, sel: Selection) -> dict[str, torch.Tensor]:
        """The model on one selection `(1, M, ...)` (padding masked). `{task: (n_out,)}`."""
        batch = stack_selections([sel], {}, self.selector.memory_size).to(self.runtime.device)
        with self.runtime.autocast():
            logits, _ = self.model(batch.patches, batch.positions, batch.mask)
        return {name: v[0].float().cpu() for name, v in logits.items()}


def check_model_fits(
    source: PatchSource, model: ModelConfig, *, features: bool, where: str, views: int = 1
) -> None:
    """A source the model cannot read: ConfigError, one line naming `where` and the mismatch (2D vs 3D
    first, in those words; then channels / patch size / feature length; then an empty grid). `views`:
    the views per item the source gives (`SourceFactory.views`)."""
    dims, want = source.spatial_dims, model.spatial_dims
    if dims != want:
        kind = "volume" if dims == 3 else "slide"
        raise ConfigError(
            f"{where}: a {dims}D {kind} store, but the model is {want}D (model.spatial_dims={want})"
        )
    expected = expected_patch_shape(model, features=features, views=views)
    if tuple(source.patch_shape) != expected:
        keys = "model.in_chans, model.patch_size, model.spatial_dims"
        raise ConfigError(
            f"{where}: patches have shape {tuple(source.patch_shape)} but the model expects {expected} "
            f"({'model.feature_dim' if features else keys})"
        )
    if len(source) == 0:
        raise ConfigError(f"{where}: the grid has no patches (empty tissue mask?)")


@dataclass
class Loaded:
    """A checkpoint ready for inference: its predictor (the model on its device, in eval mode), the
    config it was trained with, and the source factory of that config's data section."""

    predictor: Predictor
    cfg: ExperimentConfig
    sources: SourceFactory

    @property
    def model(self) -> IPSModel:
        return self.predictor.model

    def open(self, record: SlideRecord) -> PatchSource:
        """The record's patch source, checked against the model (ConfigError naming the store)."""
        source = self.sources(record)
        where = f"store {record.path}"
        check_model_fits(
            source, self.cfg.model, features=self.sources.features, where=where, views=self.sources.views
        )
        return source


def load(checkpoint: str | Path, device_name: str) -> Loaded:
    """The checkpoint's model on the chosen device; CheckpointError / ConfigError (exit 2) if unusable."""
    from ips.model.checkpoint import load_model

    device = Runtime.create(device_name).device  # a bad --device fails before the checkpoint is read
    model, cfg = load_model(checkpoint, device)
    runtime = Runtime(device, autocast_dtype_for(device, amp=cfg.train.amp))
    return Loaded(
        Predictor.from_config(model, cfg.selection, runtime), cfg, SourceFactory.from_config(cfg.data)
    )


def infer_slide(
    model: IPSModel,
    source: PatchSource,
    *,
    memory_size: int,
    iter_size: int,
    modes: Sequence[Mode] = ("topm",),
    score: str = "logit",
    runtime: Runtime | None = None,
) -> SlideInference:
    """`Predictor.infer` for a bare model (scripts, notebooks): attention of every patch and the
    predictions of `modes` for one slide; the model's modes are restored after."""
    selector = Selector(memory_size, iter_size, score=score, runtime=runtime or Runtime(torch.device("cpu")))
    return Predictor(model, selector).infer(source, modes=modes)
