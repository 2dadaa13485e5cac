"""Typed, frozen experiment configuration.

One frozen dataclass per concern (model, selection, data, train), validated in its constructor, read
from YAML by `load_config`, overridden with `key=value` strings, and written back with `to_dict` so the
resolved config travels with every run and checkpoint. An unknown key is an error that names the key and
the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ips.errors import ConfigError

TaskKind = Literal["binary", "multiclass", "multilabel", "ordinal", "regression", "survival"]
RegressionLoss = Literal["mse", "huber"]
SurvivalLoss = Literal["cox", "discrete"]
ScoreKind = Literal["logit", "softmax_mean"]
DataMode = Literal["pixels", "features"]


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass(frozen=True)
class TaskConfig:
    """One prediction task: its own query token in the aggregator and its own head.

    `binary`: one logit (BCE); `multiclass`: `num_classes` logits (CE); `multilabel`: `num_classes`
    independent logits (BCE), labels given as `;`-separated class indices; `ordinal`: `num_classes - 1`
    cumulative logits, logit k for P(label > k) (BCE on each); `regression`: one value, `loss` 'mse'
    (default) or 'huber' (delta 1: scale targets to about unit range); `survival`: one risk score (log
    hazard ratio), Cox partial likelihood over the slides forwarded together (Breslow ties), labels from
    the manifest's `time` (`label_column`) and `event` (`event_column`: 1 event, 0 censored) columns;
    with `loss: discrete`, `num_classes` logits instead, the hazard of each of `num_classes` time bins
    (cut at `time_bins`: `num_classes - 1` increasing times, by default the quantiles of the training
    slides' event times, set when training starts), negative log-likelihood per slide with censoring.
    `label_column` is the manifest column holding the label (default: the task name; `time` for survival).
    """

    name: str = "label"
    kind: TaskKind = "multiclass"
    num_classes: int = 2
    label_column: str | None = None
    weight: float = 1.0
    loss: RegressionLoss | SurvivalLoss | None = None
    event_column: str | None = None
    time_bins: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        _require(
            self.kind in typing.get_args(TaskKind),
            "model.tasks.kind",
            f"must be one of {typing.get_args(TaskKind)}, got {self.kind!r}",
        )
        if self.kind == "binary":
            _require(
                self.num_classes == 2,
                f"model.tasks[{self.name}].num_classes",
                "a binary task has num_classes 2",
            )
        else:
            _require(
                self.num_classes >= 2,
                f"model.tasks[{self.name}].num_classes",
                f"must be >= 2, got {self.num_classes}",
            )
        _require(self.weight >= 0, f"model.tasks[{self.name}].weight", "must be >= 0")
        allowed = {"regression": RegressionLoss, "survival": SurvivalLoss}.get(self.kind)
        _require(
            self.loss is None or (allowed is not None and self.loss in typing.get_args(allowed)),
            f"model.tasks[{self.name}].loss",
            f"one of {typing.get_args(RegressionLoss)} for a regression task, "
            f"{typing.get_args(SurvivalLoss)} for a survival task; got {self.loss!r} for {self.kind}",
        )
        _require(
            self.time_bins is None
            or (
                self.loss == "discrete"
                and len(self.time_bins) == self.num_classes - 1
                and all(a < b for a, b in zip(self.time_bins, self.time_bins[1:]))
            ),
            f"model.tasks[{self.name}].time_bins",
            "for a survival task with loss discrete: num_classes - 1 increasing times",
        )
        _require(
            self.event_column is None or self.kind == "survival",
            f"model.tasks[{self.name}].event_column",
            "for a survival task only",
        )

    @property
    def column(self) -> str:
        return self.label_column or ("time" if self.kind == "survival" else self.name)

    @property
    def columns(self) -> tuple[str, ...]:
        """The manifest columns of the label: `(column,)`, or `(time, event)` for survival."""
        if self.kind == "survival":
            return (self.column, self.event_column or "event")
        return (self.column,)

    @property
    def n_outputs(self) -> int:
        if self.kind == "survival" and self.loss == "discrete":
            return self.num_classes
        if self.kind in ("binary", "regression", "survival"):
            return 1
        return self.num_classes - 1 if self.kind == "ordinal" else self.num_classes


@dataclass(frozen=True)
class ModelConfig:
    """Encoder, positional encoding, cross-attention aggregator and heads.

    `encoder`: a name from `ips.model.encoders` (e.g. `resnet3d_tiny`), a pathology foundation encoder of
    `ips.foundation` (e.g. `uni`), any timm model name (2D), or `features` for precomputed feature vectors.
    `pretrained`: false, true (the hub, needs network), or a path to a local weights file.
    `encoder_norm` (ips_* encoders only): 'batch' (BatchNorm: statistics over the selected patches of the
    micro-batch in training, running averages in selection and inference; patches differ from each other
    from the first step, so bag labels teach a fresh encoder far sooner, docs/BENCHMARKS.md) or 'group'
    (each patch normalised on its own, so micro-batched gradients equal full-batch ones exactly). Unset
    (null): 'batch' for our encoders, and timm models keep their own normalisation.
    `encoder_inner` (ips_* CNNs; null = as built): the inner channels of each block in order (a basic
    block's middle, an inverted bottleneck's hidden, a Fire module's squeeze); `ips prune` writes it, so a
    pruned checkpoint rebuilds from its config. `encoder_widths` (ips_* CNNs; null = as built): the
    channels of each stage, the first one also the stem's (`ips prune --stem` narrows it). `token_keep`
    (`ips_vit_*` encoders): the share of patch tokens kept at each pruning stage in eval mode (selection
    and inference); 1 keeps every token.
    """

    encoder: str = "resnet18"
    encoder_norm: Literal["group", "batch"] | None = None
    pretrained: bool | str = False
    in_chans: int = 3
    spatial_dims: int = 2
    patch_size: int = 224
    feature_dim: int | None = None
    d_model: int = 128
    n_heads: int = 8
    d_mlp: int = 256
    dropout: float = 0.0
    pos_enc: Literal["sincos", "none"] = "sincos"
    tasks: tuple[TaskConfig, ...] = (TaskConfig(),)
    encoder_inner: tuple[int, ...] | None = None
    encoder_widths: tuple[int, ...] | None = None
    token_keep: float = 1.0

    def __post_init__(self) -> None:
        _require(
            self.spatial_dims in (2, 3), "model.spatial_dims", f"must be 2 or 3, got {self.spatial_dims}"
        )
        _require(self.in_chans >= 1, "model.in_chans", f"must be >= 1, got {self.in_chans}")
        _require(self.patch_size >= 1, "model.patch_size", f"must be >= 1, got {self.patch_size}")
        _require(self.d_model >= 1 and self.n_heads >= 1, "model.d_model", "d_model and n_heads must be >= 1")
        _require(
            self.d_model % self.n_heads == 0,
            "model.n_heads",
            f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}",
        )
        if self.pos_enc == "sincos":
            _require(
                self.d_model >= 2 * self.spatial_dims,
                "model.d_model",
                f"sincos positional encoding needs d_model >= {2 * self.spatial_dims}",
            )
        _require(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        _require(
            self.encoder_norm in (None, "group", "batch"),
            "model.encoder_norm",
            f"must be 'group' or 'batch', got {self.encoder_norm!r}",
        )
        _require(len(self.tasks) >= 1, "model.tasks", "needs at least one task")
        if self.encoder_inner is not None:
            _require(
                all(c >= 1 for c in self.encoder_inner),
                "model.encoder_inner",
                f"channels must be >= 1, got {list(self.encoder_inner)}",
            )
        if self.encoder_widths is not None:
            _require(
                all(c >= 1 for c in self.encoder_widths),
                "model.encoder_widths",
                f"channels must be >= 1, got {list(self.encoder_widths)}",
            )
        _require(
            0.0 < self.token_keep <= 1.0, "model.token_keep", f"must be in (0, 1], got {self.token_keep}"
        )
        names = [t.name for t in self.tasks]
        _require(len(set(names)) == len(names), "model.tasks", f"task names must be unique, got {names}")
        if self.encoder == "features":
            _require(
                self.feature_dim is not None and self.feature_dim >= 1,
                "model.feature_dim",
                "encoder 'features' needs feature_dim (the length of each precomputed vector)",
            )


@dataclass(frozen=True)
class SelectionConfig:
    """Iterative patch selection: memory size M, iteration (chunk) size I, the score.

    `memory_size` M (default 8): more selected patches dilute the one that matters in the pooled
    attention (docs/BENCHMARKS.md); tasks that need many patches at once (counting digits) set more.

    `explore` (training only; default 0.25, a quarter of the slots): the share of the M slots given to
    patches drawn from the rest of the bag instead of the lowest-scoring selected ones. With a fresh
    encoder the informative patches can rank consistently last (e.g. a few bright patches among many
    alike), and top-M alone then never shows them to the model; a few explored slots let training find
    them. Selection at inference is unchanged. `explore: 0` is the paper's exact IPS.

    `explore_novel`: the share of those slots drawn from the slide's most *novel* patches, the ones whose
    embedding lies furthest from the slide's typical patch (`ips.algo.novelty`), instead of uniformly. A
    small object is rare, so uniform slots show it to the model on a few percent of slides per epoch; the
    novel slots on most (docs/BENCHMARKS.md). Costs one extra chunk of encoder work per training slide.

    `cascade` (off by default): select in two stages (`ips.algo.cascade`). A small coarse scorer
    (`cascade_width` channels) scores every patch on a `cascade_factor`x downsampled view of the same
    pixels (the store's pyramid level where it has one); the `cascade_candidates` best (a share of N
    when <= 1, else a count; never fewer than 4 M) go on to the exact top-M with the full model. The
    result equals IPS restricted to the candidates. Training teaches the scorer the full model's
    attention (`ips.training.distill`, AdamW at `cascade_lr`) on each slide's selected patches plus
    `cascade_explore` patches drawn from the whole slide; for the first `cascade_warmup_epochs` epochs
    training and validation select by the full pass while the scorer learns. Heatmaps always run the
    full pass.
    """

    memory_size: int = 8
    iter_size: int = 64
    score: ScoreKind = "logit"
    prefetch: int = 2
    explore: float = 0.25
    explore_novel: float = 1.0
    cascade: bool = False
    cascade_candidates: float = 0.1
    cascade_factor: int = 4
    cascade_width: int = 16
    cascade_explore: int = 16
    cascade_lr: float = 1e-3
    cascade_warmup_epochs: int = 2

    def __post_init__(self) -> None:
        _require(self.memory_size >= 1, "selection.memory_size", f"M must be >= 1, got {self.memory_size}")
        _require(self.iter_size >= 1, "selection.iter_size", f"I must be >= 1, got {self.iter_size}")
        _require(
            self.score in typing.get_args(ScoreKind),
            "selection.score",
            f"must be one of {typing.get_args(ScoreKind)}, got {self.score!r}",
        )
        _require(self.prefetch >= 0, "selection.prefetch", "must be >= 0")
        _require(0.0 <= self.explore < 1.0, "selection.explore", f"must be in [0, 1), got {self.explore}")
        _require(
            0.0 <= self.explore_novel <= 1.0,
            "selection.explore_novel",
            f"must be in [0, 1], got {self.explore_novel}",
        )
        _require(
            self.cascade_candidates > 0
            and (self.cascade_candidates <= 1 or float(self.cascade_candidates).is_integer()),
            "selection.cascade_candidates",
            f"must be a share in (0, 1] or a whole count > 1, got {self.cascade_candidates}",
        )
        f = self.cascade_factor
        _require(
            f >= 2 and f & (f - 1) == 0,
            "selection.cascade_factor",
            f"must be a power of two >= 2 (the pyramid's levels halve), got {f}",
        )
        _require(
            self.cascade_width >= 1, "selection.cascade_width", f"must be >= 1, got {self.cascade_width}"
        )
        _require(
            self.cascade_explore >= 0,
            "selection.cascade_explore",
            f"must be >= 0, got {self.cascade_explore}",
        )
        _require(self.cascade_lr > 0, "selection.cascade_lr", f"must be > 0, got {self.cascade_lr}")
        _require(
            self.cascade_warmup_epochs >= 0,
            "selection.cascade_warmup_epochs",
            f"must be >= 0, got {self.cascade_warmup_epochs}",
        )


@dataclass(frozen=True)
class DataConfig:
    """Where slides come from and how patches are read.

    Training-time augmentation (`augment`, `ips.data.augment`) of the selected patches: `orientation`
    (flips and quarter turns; off where orientation carries the label, e.g. digits: a turned 6 is a 9),
    `color_jitter`, and `shift` (each patch moved by up to this many pixels along every spatial axis,
    reflect-padded; 0 = off).

    `context` (pixels only; 1 = off): each grid cell is also read as the window of `context` patch sides
    centred on it, area-averaged down to the patch size (`ips.data.context`), and the encoder embeds both
    views, so an object larger than a patch is seen whole from every cell it touches. The model takes
    the views from this key alone (`model.in_chans` stays the image's channels); encoder work per patch
    doubles.
    """

    manifest: str | None = None
    mode: DataMode = "pixels"
    grid: str = "default"
    features: str = "default"
    read_threads: int = 4
    augment: bool = True
    orientation: bool = True
    color_jitter: float = 0.05
    shift: int = 0
    context: int = 1

    def __post_init__(self) -> None:
        _require(
            self.mode in typing.get_args(DataMode),
            "data.mode",
            f"must be one of {typing.get_args(DataMode)}, got {self.mode!r}",
        )
        _require(self.read_threads >= 1, "data.read_threads", "must be >= 1")
        _require(0.0 <= self.color_jitter <= 0.5, "data.color_jitter", "must be in [0, 0.5]")
        _require(self.shift >= 0, "data.shift", f"must be >= 0 pixels, got {self.shift}")
        _require(self.context >= 1, "data.context", f"must be >= 1 patch sides, got {self.context}")
        _require(
            self.context == 1 or self.mode == "pixels",
            "data.context",
            "reads pixels around each cell: it needs data.mode 'pixels'",
        )

    @property
    def views(self) -> int:
        """Views of each cell the model takes: 2 (the patch and its context) where `context` > 1, else 1."""
        return 2 if self.context > 1 else 1


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, batching, budget and bookkeeping.

    The defaults are the recipe measured to take off from bag labels alone (docs/BENCHMARKS.md, "Small
    objects among similar distractors"): AdamW at `lr` 5e-4 with `weight_decay` 0.01, one warm-up epoch
    then cosine, 30 `epochs`, `batch_size` 4 slides; at lr 1e-3 training from a pretrained encoder stalled.

    `bn_recalibration_slides` (models with BatchNorm only): after each epoch, re-estimate the BatchNorm
    running statistics from the top-M selections of this many training slides (a fixed set drawn by
    seed; `ips.training.batchnorm`). It steadies the validation metrics that stale running averages make
    jump, but did not raise final accuracy everywhere (docs/BENCHMARKS.md), so it is off (0) by default.

    Slides whose manifest row names an `annotation` (`ips.data.annotations`) are trained with guidance:
    `annotation_slots` of the M slots hold annotated patches, and `annotation_weight` weighs a patch-level
    loss on their selection scores (`ips.training.step.annotation_loss`). Other slides train as before.


    The take-off guard (`ips.training.takeoff`): at epoch `takeoff_epoch` (null: off; runs shorter than it
    are not judged), a task whose AUROC (C-index for regression, ordinal and survival tasks; validation,
    else training; the mean over the last 3 epochs) is
    below `takeoff_auroc` has not left chance: `ips train` says so in one line with what to try, and
    while `restarts` remain it sets the run aside and starts again from another seed, keeping the best
    run by `monitor` (`ips.training.restarts`).

    The whole-bag loss (`ips.training.bagloss`): `bag_weight` weighs a second task loss of the aggregator
    and heads on the detached embeddings of every patch of each training slide (a uniform sample of
    `bag_cap` where a slide has more), which the selection pass computes anyway. It trains the attention
    to rank the whole slide, not only the top M it already prefers; the encoder learns from the top M.
    """

    epochs: int = 30
    batch_size: int = 4
    micro_batch_size: int | None = None
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    grad_clip: float | None = 1.0
    seed: int = 0
    vram_budget_gb: float | None = None
    amp: bool = True
    channels_last: bool = True
    early_stopping_patience: int | None = None
    monitor: str = "val_loss"
    device: str = "auto"
    bn_recalibration_slides: int = 0
    annotation_weight: float = 1.0
    annotation_slots: float = 0.25
    freeze_encoder_epochs: int = 0
    encoder_lr_scale: float = 1.0
    takeoff_epoch: int | None = 12
    takeoff_auroc: float = 0.6
    restarts: int = 1
    bag_weight: float = 0.0
    bag_cap: int = 4096

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        _require(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        if self.micro_batch_size is not None:
            _require(
                1 <= self.micro_batch_size <= self.batch_size,
                "train.micro_batch_size",
                f"must be in [1, batch_size={self.batch_size}], got {self.micro_batch_size}",
            )
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _require(self.warmup_epochs >= 0, "train.warmup_epochs", "must be >= 0")
        if self.grad_clip is not None:
            _require(self.grad_clip > 0, "train.grad_clip", "must be > 0 or null")
        if self.vram_budget_gb is not None:
            _require(self.vram_budget_gb > 0, "train.vram_budget_gb", "must be > 0 or null")
        _require(
            self.annotation_weight >= 0,
            "train.annotation_weight",
            f"must be >= 0, got {self.annotation_weight}",
        )
        _require(
            0 <= self.annotation_slots <= 1,
            "train.annotation_slots",
            f"must be in [0, 1], got {self.annotation_slots}",
        )
        _require(
            self.bn_recalibration_slides >= 0,
            "train.bn_recalibration_slides",
            f"must be >= 0, got {self.bn_recalibration_slides}",
        )
        _require(
            0 <= self.freeze_encoder_epochs <= self.epochs,
            "train.freeze_encoder_epochs",
            f"must be in [0, epochs={self.epochs}], got {self.freeze_encoder_epochs}",
        )
        _require(
            self.encoder_lr_scale > 0, "train.encoder_lr_scale", f"must be > 0, got {self.encoder_lr_scale}"
        )
        if self.takeoff_epoch is not None:
            _require(
                self.takeoff_epoch >= 1,
                "train.takeoff_epoch",
                f"must be >= 1 or null, got {self.takeoff_epoch}",
            )
        _require(
            0.5 < self.takeoff_auroc <= 1.0,
            "train.takeoff_auroc",
            f"must be in (0.5, 1] (0.5 is chance), got {self.takeoff_auroc}",
        )
        _require(self.restarts >= 0, "train.restarts", f"must be >= 0, got {self.restarts}")
        _require(self.bag_weight >= 0, "train.bag_weight", f"must be >= 0, got {self.bag_weight}")
        _require(self.bag_cap >= 1, "train.bag_cap", f"must be >= 1, got {self.bag_cap}")


PretrainMethod = Literal["auto", "simclr", "rotation"]


@dataclass(frozen=True)
class PretrainConfig:
    """Self-supervised pretraining of the model's encoder (`ips pretrain`, `ips.pretrain`).

    `method`: 'simclr' (contrastive, NT-Xent between two augmented views of each patch; 2D and 3D),
    'rotation' (predict which of 4 quarter turns a patch was given; the proxy task for volumes), or
    'auto' (simclr for 2D, rotation for 3D). Each epoch draws `patches_per_epoch` patches uniformly from
    all grid patches of the stores, `patches_per_slide` at a time from one store (one chunked read),
    so time per epoch does not grow with the number of slides. `augment_strength` scales the colour
    (H&E: HED stain jitter; grey: intensity scale/shift/gamma), blur and crop/deformation jitter.
    `content_oversample` k > 1: draw k x the patches and train on the batch's share with the most content
    (pixel standard deviation), for grids that are mostly blank (Megapixel MNIST: 225 patches, 5 digits).
    `orientation` (simclr): random flips and quarter turns in the views; turn it off where orientation
    carries meaning (digits: a turned 6 is a 9).
    """

    method: PretrainMethod = "auto"
    epochs: int = 8
    patches_per_epoch: int = 8192
    patches_per_slide: int = 16
    batch_size: int = 256
    lr: float = 2.0e-3
    weight_decay: float = 1.0e-4
    temperature: float = 0.2
    proj_dim: int = 64
    augment_strength: float = 1.0
    content_oversample: int = 1
    orientation: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _require(
            self.method in typing.get_args(PretrainMethod),
            "pretrain.method",
            f"must be one of {typing.get_args(PretrainMethod)}, got {self.method!r}",
        )
        _require(self.epochs >= 1, "pretrain.epochs", f"must be >= 1, got {self.epochs}")
        _require(self.batch_size >= 2, "pretrain.batch_size", f"must be >= 2, got {self.batch_size}")
        _require(
            self.patches_per_epoch >= self.batch_size,
            "pretrain.patches_per_epoch",
            f"must be >= batch_size={self.batch_size}, got {self.patches_per_epoch}",
        )
        _require(
            1 <= self.patches_per_slide <= self.batch_size,
            "pretrain.patches_per_slide",
            f"must be in [1, batch_size={self.batch_size}], got {self.patches_per_slide}",
        )
        _require(self.lr > 0, "pretrain.lr", f"must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, "pretrain.weight_decay", "must be >= 0")
        _require(self.temperature > 0, "pretrain.temperature", f"must be > 0, got {self.temperature}")
        _require(self.proj_dim >= 1, "pretrain.proj_dim", f"must be >= 1, got {self.proj_dim}")
        _require(0 <= self.augment_strength <= 2, "pretrain.augment_strength", "must be in [0, 2]")
        _require(
            self.content_oversample >= 1,
            "pretrain.content_oversample",
            f"must be >= 1, got {self.content_oversample}",
        )

    def resolved_method(self, spatial_dims: int) -> str:
        if self.method != "auto":
            return self.method
        return "simclr" if spatial_dims == 2 else "rotation"


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def __post_init__(self) -> None:
        _check_finite(self)
        _require(
            self.data.shift < self.model.patch_size or self.data.mode == "features",
            "data.shift",
            f"{self.data.shift} pixels must be smaller than model.patch_size {self.model.patch_size}",
        )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        return from_dict(cls, data)


# --- generic dict <-> dataclass conversion -------------------------------------------------------------


def to_dict(obj: Any) -> Any:
    """A frozen config as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _check_finite(obj: Any, prefix: str = "") -> None:
    """Every float of a config (nested sections and tuples included) is finite: inf or nan in a learning
    rate, a weight or a clip is never meant, and fails far from the key (FloatingPointError at a step)."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{key}.")
        for i, v in enumerate(value if isinstance(value, tuple) else (value,)):
            if dataclasses.is_dataclass(v) and isinstance(value, tuple):
                _check_finite(v, f"{key}[{i}].")
            elif isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{key}: must be a finite number, got {v}")


# other names people use for a key (left) -> the key's name here; checked before spelling
SYNONYMS = {
    "learning_rate": "lr",
    "learningrate": "lr",
    "base_lr": "lr",
    "wd": "weight_decay",
    "decay": "weight_decay",
    "epoch": "epochs",
    "n_epochs": "epochs",
    "num_epochs": "epochs",
    "max_epochs": "epochs",
    "batch": "batch_size",
    "bs": "batch_size",
    "micro_batch": "micro_batch_size",
    "clip": "grad_clip",
    "gradient_clip": "grad_clip",
    "clip_grad_norm": "grad_clip",
    "patience": "early_stopping_patience",
    "warmup": "warmup_epochs",
    "m": "memory_size",
    "memory": "memory_size",
    "i": "iter_size",
    "iter": "iter_size",
    "iteration_size": "iter_size",
    "patch": "patch_size",
    "patchsize": "patch_size",
    "channels": "in_chans",
    "in_channels": "in_chans",
    "num_channels": "in_chans",
    "backbone": "encoder",
    "heads": "n_heads",
    "num_heads": "n_heads",
    "threads": "read_threads",
    "num_workers": "read_threads",
    "workers": "read_threads",
    "temp": "temperature",
    "tau": "temperature",
}


def _suggest(key: str, valid: list[str]) -> str | None:
    """The valid name `key` most likely meant: a known synonym, a name that contains it as a whole word
    (`patience` -> `early_stopping_patience`), else the closest spelling."""
    low = key.lower().replace("-", "_")
    if low in valid:
        return low
    synonym = SYNONYMS.get(low)
    if synonym in valid:
        return synonym
    words = [v for v in valid if low in v.split("_") or (len(low) > 3 and low in v)]
    if len(words) == 1:
        return words[0]
    match = difflib.get_close_matches(low, valid, n=1, cutoff=0.6)
    return match[0] if match else None


def _closest(key: str, valid: list[str], prefix: str = "") -> str:
    match = _suggest(key, valid)
    return f"; did you mean {prefix + match!r}?" if match else f"; valid keys: {', '.join(valid)}"


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check and convert `value` to the annotated type `tp`; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        # try bool before str so "true" stays a bool where both are allowed
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        finite = [m for m in errors if "finite number" in m]  # the number is the type, its value is not
        raise ConfigError(finite[0] if finite else f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0]
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _type_name(tp: Any) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(tp)) or str(tp)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'{_closest(str(key), names, prefix)}")
        kwargs[key] = _convert(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - all fields have defaults
        raise ConfigError(f"{prefix}: {e}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to a config mapping; values are parsed as YAML scalars."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    valid_sections = [f.name for f in dataclasses.fields(ExperimentConfig)]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        path, raw = item.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.lr=1e-4")
        section, key = parts
        if section not in valid_sections:
            raise ConfigError(f"unknown config key {section!r}{_closest(section, valid_sections)}")
        out.setdefault(section, {})
        out[section][key] = yaml.safe_load(raw) if raw.strip() else None
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Defaults, then the YAML file at `path`, then `key=value` overrides; validated."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
    data = apply_overrides(data, overrides or [])
    return ExperimentConfig.from_dict(data)


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML; WriteError naming the file when it cannot be written."""
    from ips.errors import WriteError, os_error_line

    try:
        Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    except OSError as e:
        raise WriteError(os_error_line(e, path)) from None


def with_overrides(cfg: ExperimentConfig, **sections: dict[str, Any]) -> ExperimentConfig:
    """`cfg` with some fields of some sections replaced, validated again like a YAML file."""
    data = cfg.to_dict()
    for name, values in sections.items():
        data[name] = {**data[name], **values}
    return ExperimentConfig.from_dict(data)


def override_loaded(
    cfg: ExperimentConfig, overrides: list[str], *, fixed: tuple[str, ...] = ("model",)
) -> ExperimentConfig:
    """A checkpoint's config with `key=value` overrides, validated; ConfigError for a key of a `fixed`
    section (the checkpoint's weights fix the model: `model.*` cannot change after training)."""
    for item in overrides:
        section = item.split("=", 1)[0].strip().split(".")[0]
        if section in fixed:
            raise ConfigError(
                f"override {item!r}: {section}.* is fixed by the checkpoint's weights (retrain to change it)"
            )
    return ExperimentConfig.from_dict(apply_overrides(cfg.to_dict(), overrides)) if overrides else cfg
