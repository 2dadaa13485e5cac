"""The training loop: per batch of B slides, stream-select per slide, then train on the selections.

The entry point owns device, dtype, autocast and seeds (STYLE.md #1); modules take explicit arguments.
Every epoch's randomness derives from (seed, epoch) and the RNG states saved in the checkpoint, so a
resumed run equals one that was never interrupted.
"""

from __future__ import annotations

import difflib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ips.algo.batch import SelectedBatch, stack_selections
from ips.algo.novelty import CohortBank
from ips.algo.selection import eval_mode, explore_selection, guide_selection, novel_pool_size, select
from ips.config import ConfigError, ExperimentConfig, save_config
from ips.data.annotations import PatchLabels, patch_labels
from ips.data.manifest import SlideRecord, read_manifest
from ips.data.open import check_source_fits_model, make_source, reuse_sources, source_grid
from ips.data.sources import PatchSource
from ips.data.store import open_store
from ips.infer.predict import predict_records, select_slides
from ips.model.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from ips.model.ips_model import IPSModel, build_model, unit_pixels
from ips.model.metrics import evaluate_logits
from ips.model.tasks import label_tensor
from ips.runtime import DistInfo, Runtime, resolve_device, seed_everything
from ips.training.batchnorm import batchnorm_layers, recalibrate_batchnorm
from ips.training.budget import GB, BudgetPlan, estimate_step_bytes, plan_micro_batch
from ips.training.distributed import barrier, broadcast_flag, shard
from ips.training.rundir import RunLock, check_fresh, check_resumable
from ips.training.runlog import MetricsLog
from ips.training.step import accumulate_gradients


def targets_for(records: Sequence[SlideRecord], cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    return {t.name: label_tensor(t, [r.labels[t.name] for r in records]) for t in cfg.model.tasks}


def is_negative(record: SlideRecord) -> bool:
    """[cohort-novelty hook] A slide whose every label is 0 (binary, class 0) or empty (multilabel)."""
    return all(v in (0, ()) for v in record.labels.values())


def epoch_order(n: int, seed: int, epoch: int, world_size: int = 1) -> list[int]:
    """The slide order of an epoch, from (seed, epoch) alone; padded by repetition to a multiple of the
    world size so that every rank gets an equal share of every global batch."""
    order = np.random.default_rng([seed, epoch]).permutation(n).tolist()
    while len(order) % world_size:
        order.append(order[len(order) % n])
    return order


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def plan_budget(
    model: IPSModel, source: PatchSource, record: SlideRecord, cfg: ExperimentConfig, rt: Runtime
) -> BudgetPlan:
    """Measure (CUDA) or estimate (CPU) one step's memory at k slides; choose the micro-batch."""
    assert cfg.train.vram_budget_gb is not None
    (sel,) = select_slides(model, [source], cfg, rt)
    targets1 = targets_for([record], cfg)

    def batch_of(k: int) -> SelectedBatch:
        return stack_selections(
            [sel] * k,
            {n: t.repeat(k, *[1] * (t.ndim - 1)) for n, t in targets1.items()},
            cfg.selection.memory_size,
        )

    def cost(k: int) -> int:
        batch = batch_of(k)
        if rt.device.type == "cuda":
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(rt.device)
            with eval_mode(model):  # the selection pass is part of the step's peak
                select(
                    model,
                    source,
                    memory_size=cfg.selection.memory_size,
                    iter_size=cfg.selection.iter_size,
                    score=cfg.selection.score,
                    device=rt.device,
                    autocast_dtype=rt.autocast_dtype,
                )
            accumulate_gradients(
                model,
                batch,
                cfg.model.tasks,
                micro_batch_size=k,
                device=rt.device,
                autocast_dtype=rt.autocast_dtype,
            )
            peak = torch.cuda.max_memory_allocated(rt.device)
            model.zero_grad(set_to_none=True)
            return int(peak)

        def step() -> torch.Tensor:
            b = batch.to(rt.device)
            logits, _ = model(b.patches, b.positions, b.mask)
            from ips.model.tasks import total_loss

            return total_loss(cfg.model.tasks, logits, b.targets).sum()

        return estimate_step_bytes(model, step)

    hint = (
        f"selection.memory_size (M={cfg.selection.memory_size}), model.patch_size ({cfg.model.patch_size}), "
        f"selection.iter_size (I={cfg.selection.iter_size}) or the encoder ({cfg.model.encoder})"
    )
    # the trial steps run in train mode: keep them from moving BatchNorm running statistics
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
        return plan_micro_batch(
            cost,
            budget_bytes=int(cfg.train.vram_budget_gb * GB),
            batch_size=cfg.train.batch_size,
            measured=rt.device.type == "cuda",
            hint=hint,
        )
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])


def recalibrate_from_selections(
    model: IPSModel, chunks: Sequence[Sequence[SlideRecord]], cfg: ExperimentConfig, rt: Runtime
) -> None:
    """Re-estimate BatchNorm statistics (`ips.training.batchnorm`) over the top-M selections of the slides in
    `chunks`, one forward per chunk (a chunk: the slides of one training micro-batch)."""
    batches = (
        stack_selections(
            select_slides(model, [make_source(r, cfg) for r in chunk], cfg, rt), {}, cfg.selection.memory_size
        )
        for chunk in chunks
    )
    recalibrate_batchnorm(model, batches, device=rt.device, autocast_dtype=rt.autocast_dtype)


def make_augment(
    cfg: ExperimentConfig, generator: torch.Generator
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Training-time augmentation of `(b, M, C, *S)` uint8 patches on the device -> float in [0, 1]."""
    if not cfg.data.augment or cfg.data.mode == "features":
        return None
    from ips.data.augment import PatchAugment

    augment = PatchAugment.from_config(cfg.data)

    def transform(patches: torch.Tensor) -> torch.Tensor:
        flat = patches.flatten(0, 1)
        return augment(unit_pixels(flat), generator).unflatten(0, patches.shape[:2])

    return transform


def param_groups(model: IPSModel, cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """AdamW groups: the encoder at `lr * encoder_lr_scale` (a pretrained encoder fine-tunes slower),
    the rest (projection, aggregator, heads) at `lr`. The schedule scales both alike."""
    enc = list(model.encoder.parameters())
    ids = {id(p) for p in enc}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [
        {"params": enc, "lr": cfg.train.lr * cfg.train.encoder_lr_scale, "name": "encoder"},
        {"params": rest, "lr": cfg.train.lr, "name": "head"},
    ]


def set_encoder_frozen(model: IPSModel, frozen: bool, *, toggle_grad: bool = True) -> None:
    """Warm-up stage (`train.freeze_encoder_epochs`): the encoder in eval mode (BatchNorm statistics fixed)
    and, where `toggle_grad`, without gradients (no backward through it); the reverse when not `frozen`.
    Call after `model.train()`."""
    if frozen:
        model.encoder.eval()
    if toggle_grad:
        for p in model.encoder.parameters():
            p.requires_grad_(not frozen)


def split_records(records: Sequence[SlideRecord]) -> tuple[list[SlideRecord], list[SlideRecord]]:
    train = [r for r in records if r.split in (None, "", "train")]
    val = [r for r in records if r.split == "val"]
    return train, val


def _monitor_better(monitor: str, new: float, best: float | None) -> bool:
    if math.isnan(new):
        return False
    if best is None:
        return True
    return new < best if monitor.endswith("loss") else new > best


@dataclass
class TrainResult:
    """What `train` returns: the per-epoch metric rows, the best monitored value and where the run is."""

    run_dir: Path
    history: list[dict[str, Any]]
    best: float | None
    monitor: str
    micro_batch_size: int


@dataclass
class _Inputs:
    train: list[SlideRecord]
    val: list[SlideRecord]
    monitor: str
    annotations: dict[str, PatchLabels]  # slide_id -> per-patch labels, for annotated training slides
    cohort: CohortBank | None = None  # [cohort-novelty hook] negative-slide embeddings for explore slots


@dataclass
class _Progress:
    """The state carried from epoch to epoch (and across a resume)."""

    start_epoch: int = 0
    best: float | None = None
    bad_epochs: int = 0


def train(
    cfg: ExperimentConfig,
    *,
    manifest: str | Path,
    run_dir: str | Path,
    dist_info: DistInfo | None = None,
    resume: bool = True,
    show_progress: bool = True,
    stop_after_epochs: int | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train per `cfg` on the slides of `manifest`; write checkpoints, metrics and curves to `run_dir`.

    Everything that can be wrong (the manifest, the stores, the run directory, a resume's config) is
    checked before anything is written. Rank 0 holds a lock on `run_dir` for the whole run.
    `stop_after_epochs` ends the run early as if interrupted (tests of resume).
    """
    dist_info = dist_info or DistInfo()
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} exists and is not a directory")
    lock = RunLock(run_dir).acquire() if dist_info.is_main else None
    rt = make_runtime(cfg, dist_info)
    try:
        with reuse_sources():  # each store opened once per run, not once per epoch and pass
            return _train_locked(cfg, manifest, run_dir, rt, resume, show_progress, stop_after_epochs, log)
    finally:
        if rt.device.type == "cuda" and cfg.train.vram_budget_gb is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, rt.device)  # leave the process as it was
        if lock is not None:
            lock.release()


def _train_locked(
    cfg: ExperimentConfig,
    manifest: str | Path,
    run_dir: Path,
    rt: Runtime,
    resume: bool,
    show_progress: bool,
    stop_after_epochs: int | None,
    log: Callable[[str], None],
) -> TrainResult:
    inputs = load_inputs(cfg, manifest, rt.dist, log)
    saved = _checked_run_dir(cfg, run_dir, resume, rt, log)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model).to(rt.device)
    if rt.device.type == "cuda" and cfg.train.channels_last and cfg.model.spatial_dims == 2:
        model = model.to(memory_format=torch.channels_last)
    micro = choose_micro_batch(model, inputs.train[0], cfg, rt, log)
    net: nn.Module = model
    if rt.dist.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
        )
    optimizer, scheduler = make_optimizer(model, cfg, len(inputs.train), rt.dist.world_size)
    progress = _Progress()
    metrics_log = None
    if rt.dist.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")  # only now: every check has passed
        metrics_log = MetricsLog(run_dir, tensorboard=False)
    if saved is not None:
        progress = _restore(saved, model, optimizer, scheduler)
        if metrics_log:
            metrics_log.truncate(progress.start_epoch)
        log(f"resumed from {run_dir / 'checkpoints' / 'last.pt'} after epoch {progress.start_epoch}")
    calibration = calibration_chunks(model, inputs.train, cfg, micro)
    for epoch in range(progress.start_epoch + 1, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        row = run_epoch(model, net, optimizer, scheduler, inputs, cfg, rt, epoch, micro, show_progress)
        if calibration:
            # on every rank, on the same slides: selection on each rank uses its own running statistics
            recalibrate_from_selections(model, calibration, cfg, rt)
        stop = False
        if rt.dist.is_main:
            assert metrics_log is not None
            stop = _end_epoch(
                row, t0, model, optimizer, scheduler, inputs, cfg, rt, run_dir, metrics_log, progress, log
            )
        stop = broadcast_flag(stop, rt.dist, rt.device)
        barrier(rt.dist)
        if stop or (stop_after_epochs is not None and epoch >= stop_after_epochs):
            break
    if metrics_log is not None:
        metrics_log.plot()
        metrics_log.close()
    history = metrics_log.rows if metrics_log else []
    return TrainResult(run_dir, history, progress.best, inputs.monitor, micro)


def make_runtime(cfg: ExperimentConfig, dist_info: DistInfo) -> Runtime:
    """Device (this rank's GPU under torchrun), autocast dtype; checks the batch splits over the ranks."""
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    if cfg.train.batch_size % dist_info.world_size:
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) must be divisible by the number of "
            f"processes ({dist_info.world_size})"
        )
    autocast_dtype = torch.bfloat16 if (cfg.train.amp and device.type == "cuda") else None
    return Runtime(device, autocast_dtype, dist_info)


def load_inputs(
    cfg: ExperimentConfig, manifest: str | Path, dist_info: DistInfo, log: Callable[[str], None]
) -> _Inputs:
    """The manifest's train and val slides, each store checked against the model; the monitored metric.

    Warns (rank 0) when there is no validation split or a task's training labels hold a single class."""
    records = read_manifest(manifest, cfg.model.tasks)
    train_records, val_records = split_records(records)
    if not train_records:
        raise ConfigError(f"{manifest}: no slides in the train split")
    for r in [*train_records, *val_records]:
        check_source_fits_model(make_source(r, cfg), cfg, f"slide {r.slide_id} ({r.path})")
    monitor = check_monitor(cfg, train_records, bool(val_records))
    warn = log if dist_info.is_main else (lambda _: None)
    if not val_records:
        warn(
            f"warning: {manifest} has no val split: nothing measures generalisation, and best.pt is chosen "
            f"by {monitor}"
        )
    for task in cfg.model.tasks:
        seen = {_label_key(r.labels[task.name]) for r in train_records}
        if len(seen) < 2:
            warn(
                f"warning: task {task.name!r}: every training slide has the label {next(iter(seen))}; the "
                "model can only learn that one class"
            )
    guided = cfg.train.annotation_weight + cfg.train.annotation_slots > 0
    annotations = {r.slide_id: _patch_labels(r, cfg) for r in train_records if r.annotation and guided}
    if annotations:
        warn(
            f"{len(annotations)} of {len(train_records)} training slides are annotated: patch-level guidance "
            f"(train.annotation_slots {cfg.train.annotation_slots}, train.annotation_weight "
            f"{cfg.train.annotation_weight})"
        )
    # [cohort-novelty hook] measured as an alternative to the slide's own novelty (docs/BENCHMARKS.md,
    # "Learnability matrix"); switched on by the environment only while it is being measured
    cohort = CohortBank() if os.environ.get("IPS_EXPLORE_REFERENCE") == "cohort" else None
    return _Inputs(train_records, val_records, monitor, annotations, cohort)


def _patch_labels(record: SlideRecord, cfg: ExperimentConfig) -> PatchLabels:
    """The slide's annotation on the grid it is read from (one store open)."""
    store = open_store(record.path)
    return patch_labels(record.annotation, store, source_grid(store, cfg))


def _label_key(label: Any) -> Any:
    return tuple(label) if isinstance(label, (list, tuple)) else label


def metric_names(cfg: ExperimentConfig, records: Sequence[SlideRecord]) -> list[str]:
    """Every key an epoch's row can hold for these tasks: `train_loss`, `val_loss`, `{train,val}_<task>/<m>`."""
    sample = list(records[:1])
    targets = targets_for(sample, cfg)
    logits = {t.name: torch.zeros(len(sample), t.n_outputs) for t in cfg.model.tasks}
    names = [k for k in evaluate_logits(cfg.model.tasks, logits, targets) if k != "loss"]
    return ["train_loss", "val_loss", *(f"{split}_{n}" for split in ("train", "val") for n in names)]


def check_monitor(cfg: ExperimentConfig, train_records: Sequence[SlideRecord], has_val: bool) -> str:
    """`train.monitor` as used: ConfigError (with the closest name) for an unknown metric; a val metric
    without a val split falls back to `train_loss` (the warning says so)."""
    valid = metric_names(cfg, train_records)
    monitor = cfg.train.monitor
    if monitor not in valid:
        close = difflib.get_close_matches(monitor, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"train.monitor: unknown metric {monitor!r}{hint}; one of {', '.join(valid)}")
    if monitor.startswith("val_") and not has_val:
        return "train_loss"
    return monitor


def _checked_run_dir(
    cfg: ExperimentConfig, run_dir: Path, resume: bool, rt: Runtime, log: Callable[[str], None]
) -> dict[str, Any] | None:
    """The checkpoint to resume from (None: a fresh run), after the run-directory checks (`rundir`)."""
    last = run_dir / "checkpoints" / "last.pt"
    if not resume:
        if rt.dist.is_main:
            check_fresh(run_dir)
        return None
    if not last.exists():
        return None
    state = load_checkpoint(last, map_location=rt.device)
    accepted = check_resumable(run_dir, state["config"], cfg.to_dict())
    if accepted and rt.dist.is_main:
        log(f"resuming with changed {'; '.join(accepted)}")
    return state


def _restore(
    state: dict[str, Any], model: IPSModel, optimizer: torch.optim.Optimizer, scheduler: Any
) -> _Progress:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])  # the schedule's length comes from this run's train.epochs
    set_rng_state(state["rng"])
    extra = state["extra"]
    return _Progress(state["epoch"], extra.get("best"), extra.get("bad_epochs", 0))


def choose_micro_batch(
    model: IPSModel, first: SlideRecord, cfg: ExperimentConfig, rt: Runtime, log: Callable[[str], None]
) -> int:
    """Slides per forward on this rank: `train.micro_batch_size`, else the budget planner's, else all."""
    local_batch = cfg.train.batch_size // rt.dist.world_size
    micro = cfg.train.micro_batch_size or local_batch
    if cfg.train.vram_budget_gb is not None:
        plan = plan_budget(model, make_source(first, cfg), first, cfg, rt)
        if cfg.train.micro_batch_size is None:
            micro = plan.micro_batch_size
        log(plan.describe() + ("" if plan.measured else " (no CUDA: an estimate, not enforced)"))
        if rt.device.type == "cuda":
            total = torch.cuda.get_device_properties(rt.device).total_memory
            torch.cuda.set_per_process_memory_fraction(
                min(1.0, cfg.train.vram_budget_gb * GB / total), rt.device
            )
    micro = min(micro, local_batch)
    if micro < local_batch and batchnorm_layers(model):
        log(
            f"note: the encoder has BatchNorm and micro-batches hold {micro} slides: it normalises over each "
            "micro-batch's patches, so gradients are close to, not equal to, full-batch ones"
        )
    return micro


def make_optimizer(model: IPSModel, cfg: ExperimentConfig, n_train: int, world_size: int) -> tuple[Any, Any]:
    """AdamW with linear warm-up and cosine decay over `train.epochs`."""
    optimizer = torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.train.weight_decay)
    padded_n = len(epoch_order(n_train, cfg.train.seed, 0, world_size))
    steps_per_epoch = math.ceil(padded_n / cfg.train.batch_size)
    warmup = int(round(cfg.train.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, warmup_steps=warmup, total_steps=steps_per_epoch * cfg.train.epochs)
    )
    return optimizer, scheduler


def calibration_chunks(
    model: IPSModel, train_records: Sequence[SlideRecord], cfg: ExperimentConfig, micro: int
) -> list[list[SlideRecord]]:
    """The BatchNorm recalibration set: fixed for the run, in micro-batches as training normalises them."""
    n = cfg.train.bn_recalibration_slides if batchnorm_layers(model) else 0
    pick = np.sort(np.random.default_rng(cfg.train.seed).permutation(len(train_records))[:n])
    return [[train_records[i] for i in pick[j : j + micro]] for j in range(0, len(pick), micro)]


def run_epoch(
    model: IPSModel,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    inputs: _Inputs,
    cfg: ExperimentConfig,
    rt: Runtime,
    epoch: int,
    micro: int,
    show_progress: bool,
) -> dict[str, Any]:
    """One pass over the training slides: per global batch, select on this rank's slides, then step.
    Returns the epoch's row: train loss, learning rate and train metrics."""
    train_records = inputs.train
    order = epoch_order(len(train_records), cfg.train.seed, epoch, rt.dist.world_size)
    transform = make_augment(
        cfg, torch.Generator(device=rt.device).manual_seed(cfg.train.seed * 1000 + epoch)
    )
    logits: dict[str, list[torch.Tensor]] = {t.name: [] for t in cfg.model.tasks}
    targets: dict[str, list[torch.Tensor]] = {t.name: [] for t in cfg.model.tasks}
    loss_sum, n_seen = 0.0, 0
    batches = [order[i : i + cfg.train.batch_size] for i in range(0, len(order), cfg.train.batch_size)]
    bar = _progress(len(batches), f"epoch {epoch}/{cfg.train.epochs}", show_progress and rt.dist.is_main)
    for global_batch in batches:
        mine = [train_records[i] for i in shard(global_batch, rt.dist)]
        seed = [cfg.train.seed, epoch, *global_batch, rt.dist.rank]
        # [cohort-novelty hook]: cohort=inputs.cohort
        batch = selected_batch(model, mine, cfg, rt, seed, inputs.annotations, cohort=inputs.cohort)
        model.train()
        frozen = epoch <= cfg.train.freeze_encoder_epochs
        set_encoder_frozen(model, frozen, toggle_grad=not rt.dist.enabled)
        optimizer.zero_grad(set_to_none=True)
        loss, batch_logits = accumulate_gradients(
            net,
            batch,
            cfg.model.tasks,
            micro_batch_size=micro,
            device=rt.device,
            autocast_dtype=rt.autocast_dtype,
            no_sync=rt.dist.enabled,
            transform=transform,
            normalizer=len(global_batch) / rt.dist.world_size,
            annotation_weight=cfg.train.annotation_weight,
            instance_weight=cfg.train.instance_weight,
        )
        if frozen:  # under DDP the encoder still gets gradients (all ranks must reduce the same set)
            for p in model.encoder.parameters():
                p.grad = None
        if cfg.train.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        loss_sum += loss * len(mine)
        n_seen += len(mine)
        for name in logits:
            logits[name].append(batch_logits[name])
            targets[name].append(batch.targets[name])
        if bar is not None:
            postfix = {"loss": f"{loss:.3f}", "lr": f"{scheduler.get_last_lr()[-1]:.2e}"}
            if rt.device.type == "cuda":
                postfix["mem"] = f"{torch.cuda.max_memory_allocated(rt.device) / GB:.2f}G"
            bar.set_postfix(postfix)
            bar.update(1)
    if bar is not None:
        bar.close()
    row: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": loss_sum / max(1, n_seen),
        "lr": scheduler.get_last_lr()[-1],
    }
    metrics = evaluate_logits(
        cfg.model.tasks,
        {k: torch.cat(v) for k, v in logits.items()},
        {k: torch.cat(v).cpu() for k, v in targets.items()},
    )
    row.update({f"train_{k}": v for k, v in metrics.items() if k != "loss"})
    return row


def selected_batch(
    model: IPSModel,
    records: Sequence[SlideRecord],
    cfg: ExperimentConfig,
    rt: Runtime,
    explore_seed: Sequence[int],
    annotations: dict[str, PatchLabels] | None = None,
    *,
    cohort: CohortBank | None = None,
) -> SelectedBatch:
    """The slides' top-M selections, with `selection.explore` slots (novel or random) and, on annotated slides,
    `train.annotation_slots` annotated ones; stacked with their targets (and patch targets)."""
    sources = [make_source(r, cfg) for r in records]
    rng = np.random.default_rng(list(explore_seed))
    sel_cfg = cfg.selection
    pool = novel_pool_size(sel_cfg.memory_size, sel_cfg.explore, sel_cfg.explore_novel)
    # [cohort-novelty hook] novelty against the negative slides' patches instead of the slide's own
    novelty = None if cohort is None or not pool else [cohort.for_slide(is_negative(r)) for r in records]
    selections = select_slides(model, sources, cfg, rt, novel_pool=pool, generator=rng, novelty=novelty)
    if sel_cfg.explore > 0:  # pool 0 means no novel slot at M, hence none at m <= M either
        selections = [
            explore_selection(
                sel, src, fraction=sel_cfg.explore, generator=rng, novel_share=sel_cfg.explore_novel
            )
            for sel, src in zip(selections, sources)
        ]
    patch_targets: list[np.ndarray | None] = [None] * len(records)
    for i, r in enumerate(records):
        labels = (annotations or {}).get(r.slide_id)
        if labels is None:
            continue
        if cfg.train.annotation_slots > 0:
            selections[i] = guide_selection(
                selections[i],
                sources[i],
                candidates=labels.positives(),
                fraction=cfg.train.annotation_slots,
                generator=rng,
            )
        patch_targets[i] = labels.of(selections[i].indices.numpy())
    return stack_selections(selections, targets_for(records, cfg), cfg.selection.memory_size, patch_targets)


def _end_epoch(
    row: dict[str, Any],
    t0: float,
    model: IPSModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    inputs: _Inputs,
    cfg: ExperimentConfig,
    rt: Runtime,
    run_dir: Path,
    metrics_log: MetricsLog,
    progress: _Progress,
    log: Callable[[str], None],
) -> bool:
    """Rank 0 after an epoch: validate, checkpoint, log; True when early stopping ends the run."""
    if inputs.val:
        val_logits = predict_records(model, inputs.val, cfg, rt)
        row.update(
            {
                f"val_{k}": v
                for k, v in evaluate_logits(cfg.model.tasks, val_logits, targets_for(inputs.val, cfg)).items()
            }
        )
    row["seconds"] = time.perf_counter() - t0
    if rt.device.type == "cuda":
        row["peak_device_gb"] = torch.cuda.max_memory_allocated(rt.device) / GB
    improved = _monitor_better(inputs.monitor, row[inputs.monitor], progress.best)
    if improved:
        progress.best, progress.bad_epochs = row[inputs.monitor], 0
    else:
        progress.bad_epochs += 1
    extra = {"best": progress.best, "bad_epochs": progress.bad_epochs, "monitor": inputs.monitor}
    checkpoints = run_dir / "checkpoints"
    save_checkpoint(
        checkpoints / "last.pt",
        model=model,
        config=cfg,
        epoch=row["epoch"],
        metrics=row,
        optimizer=optimizer,
        scheduler=scheduler,
        extra=extra,
    )
    if improved:
        save_checkpoint(
            checkpoints / "best.pt", model=model, config=cfg, epoch=row["epoch"], metrics=row, extra=extra
        )
    metrics_log.append(row)
    log(_summary(row, cfg))
    patience = cfg.train.early_stopping_patience
    if patience is not None and progress.bad_epochs >= patience:
        log(f"early stopping: {inputs.monitor} did not improve for {patience} epochs")
        return True
    return False


def _summary(row: dict[str, Any], cfg: ExperimentConfig) -> str:
    parts = [f"epoch {row['epoch']}", f"train_loss {row['train_loss']:.4f}"]
    if "val_loss" in row:
        parts.append(f"val_loss {row['val_loss']:.4f}")
        for t in cfg.model.tasks:
            parts.append(
                f"{t.name}: acc {row.get(f'val_{t.name}/accuracy', float('nan')):.3f} "
                f"auroc {row.get(f'val_{t.name}/auroc', float('nan')):.3f}"
            )
    parts.append(f"{row['seconds']:.1f}s")
    return " | ".join(parts)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False)
