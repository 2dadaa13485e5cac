"""The training loop: per batch of B slides, stream-select per slide, then train on the selections.

`train` builds one `Trainer`, which holds the run's state (model, optimiser, schedule, runtime, inputs,
progress), and runs `Trainer.fit`: read it top to bottom. The entry point owns device, dtype, autocast
and seeds; the modules below take explicit arguments. Every epoch's randomness derives from
(seed, epoch) and the RNG states saved in the checkpoint, so a resumed run equals one that was never
interrupted.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ips.algo.batch import SelectedBatch, stack_selections
from ips.algo.selection import guide_selection
from ips.config import ConfigError, DataConfig, ExperimentConfig, TrainConfig, save_config
from ips.data.manifest import SlideRecord
from ips.data.open import SourceFactory
from ips.data.sources import PatchSource
from ips.infer.engine import Predictor, Selector
from ips.model.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from ips.model.ips_model import IPSModel, build_model, unit_pixels
from ips.model.metrics import TAKEOFF_METRIC, evaluate_logits, lower_is_better
from ips.model.tasks import total_loss
from ips.runtime import DistInfo, Runtime, seed_everything
from ips.training.bagloss import BagEmbeddings
from ips.training.batchnorm import batchnorm_layers, recalibrate_batchnorm
from ips.training.budget import GB, BudgetPlan, estimate_step_bytes, plan_micro_batch
from ips.training.distill import CascadeDistiller
from ips.training.distributed import barrier, broadcast_flag, shard
from ips.training.explore import explore_selections
from ips.training.inputs import Inputs, load_inputs, targets_for
from ips.training.rundir import RunLock, check_fresh, check_resumable, check_same_data
from ips.training.runlog import MetricsLog, progress_bar
from ips.training.schedule import warmup_cosine_schedule
from ips.training.step import accumulate_gradients

__all__ = ["EpochHook", "Progress", "TrainResult", "Trainer", "plan_budget", "targets_for", "train"]


@dataclass
class TrainResult:
    """What `train` returns: the per-epoch metric rows, the best monitored value, where the run is, and
    why it stopped before `train.epochs` (None: it did not, or it was interrupted)."""

    run_dir: Path
    history: list[dict[str, Any]]
    best: float | None
    monitor: str
    micro_batch_size: int
    stop_reason: str | None = None


@dataclass
class Progress:
    """What carries from epoch to epoch (and across a resume): the last finished epoch, the best
    monitored value, the epochs since it improved, and why the run stops early (None: it goes on)."""

    epoch: int = 0
    best: float | None = None
    bad_epochs: int = 0
    stop_reason: str | None = None


# Called on rank 0 at the end of every epoch, once the epoch's row (train and val metrics) is logged and
# its checkpoints are written: a returned text stops the run like early stopping and becomes
# `TrainResult.stop_reason`; None lets it go on.
EpochHook = Callable[["Trainer", dict[str, Any]], "str | None"]


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
    epoch_hooks: Sequence[EpochHook] = (),
) -> TrainResult:
    """Train per `cfg` on the slides of `manifest`; write checkpoints, metrics and curves to `run_dir`.

    Everything that can be wrong (the manifest, the stores, the run directory, a resume's config) is
    checked before anything is written. Rank 0 holds a lock on `run_dir` for the whole run.
    `stop_after_epochs` ends the run early as if interrupted (tests of resume). `epoch_hooks`: checks
    run at the end of every epoch (`EpochHook`).
    """
    dist_info = dist_info or DistInfo()
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} exists and is not a directory")
    lock = RunLock(run_dir).acquire() if dist_info.is_main else None
    runtime = make_runtime(cfg.train, dist_info)
    try:
        trainer = Trainer.create(
            cfg, manifest=manifest, run_dir=run_dir, runtime=runtime, resume=resume, log=log
        )
        trainer.epoch_hooks.extend(epoch_hooks)
        return trainer.fit(stop_after_epochs=stop_after_epochs, show_progress=show_progress)
    finally:
        if runtime.device.type == "cuda" and cfg.train.vram_budget_gb is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, runtime.device)  # leave the process as it was
        if lock is not None:
            lock.release()


def make_runtime(train_cfg: TrainConfig, dist_info: DistInfo) -> Runtime:
    """The runtime of `cfg.train` (this rank's GPU under torchrun); checks the batch splits over the ranks."""
    if train_cfg.batch_size % dist_info.world_size:
        raise ConfigError(
            f"train.batch_size ({train_cfg.batch_size}) must be divisible by the number of "
            f"processes ({dist_info.world_size})"
        )
    return Runtime.from_config(train_cfg, dist_info)


class Trainer:
    """One training run's state in one place: the config, runtime and run directory; the inputs and
    their source factory; the model (and its DDP wrapper `net`), optimiser and schedule; the selector
    and the predictor validation uses; the micro-batch size, the BatchNorm calibration slides; the
    progress and the metrics log; the epoch-end hooks. Build it with `Trainer.create`."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        run_dir: Path,
        runtime: Runtime,
        inputs: Inputs,
        sources: SourceFactory,
        model: IPSModel,
        micro_batch_size: int,
        log: Callable[[str], None] = print,
        distiller: CascadeDistiller | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.runtime, self.log = cfg, run_dir, runtime, log
        self.distiller = distiller  # selection.cascade: teaches the coarse scorer
        self.inputs, self.sources = inputs, sources
        self.model = model
        self.net: nn.Module = model
        if runtime.dist.enabled:
            device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.optimizer, self.scheduler = make_optimizer(
            model, cfg.train, len(inputs.train), runtime.dist.world_size
        )
        self.selector = Selector.from_config(cfg.selection, runtime)
        self.predictor = Predictor(model, self.selector)
        self.micro_batch_size = micro_batch_size
        self.calibration = calibration_chunks(model, inputs.train, cfg.train, micro_batch_size)
        self.progress = Progress()
        self.metrics_log: MetricsLog | None = None
        self.epoch_hooks: list[EpochHook] = []

    @classmethod
    def create(
        cls,
        cfg: ExperimentConfig,
        *,
        manifest: str | Path,
        run_dir: Path,
        runtime: Runtime,
        resume: bool = True,
        log: Callable[[str], None] = print,
    ) -> Trainer:
        """Check the inputs and the run directory, build the model (seeded), choose the micro-batch,
        then (rank 0) write the config and open the metrics log; resume from `last.pt` where it exists."""
        sources = SourceFactory.from_config(cfg.data, reuse=True)  # each store opened once per run
        inputs = load_inputs(cfg, manifest, sources=sources, is_main=runtime.dist.is_main, log=log)
        # discrete-time survival: the time bins from the training slides, saved with the config
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tasks=inputs.tasks))
        saved = _checked_run_dir(cfg, run_dir, resume, runtime, log)
        check_same_data(
            run_dir,
            [*inputs.train, *inputs.val],
            cfg.data,
            resuming=saved is not None,
            write=runtime.dist.is_main,
        )
        seed_everything(cfg.train.seed)
        model = build_model(cfg.model, views=cfg.data.views).to(runtime.device)
        if runtime.device.type == "cuda" and cfg.train.channels_last and cfg.model.spatial_dims == 2:
            model = model.to(memory_format=torch.channels_last)
        distiller = CascadeDistiller(model, cfg.selection, runtime) if cfg.selection.cascade else None
        first = inputs.train[0]
        micro = choose_micro_batch(model, sources(first), first, cfg, runtime, log)
        trainer = cls(
            cfg,
            run_dir=run_dir,
            runtime=runtime,
            inputs=inputs,
            sources=sources,
            model=model,
            micro_batch_size=micro,
            log=log,
            distiller=distiller,
        )
        if runtime.dist.is_main:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")  # only now: every check has passed
            trainer.metrics_log = MetricsLog(run_dir)
        if saved is not None:
            trainer.restore(saved)
            log(f"resumed from {run_dir / 'checkpoints' / 'last.pt'} after epoch {trainer.progress.epoch}")
        return trainer

    # --- the loop -----------------------------------------------------------------------------------

    def fit(self, *, stop_after_epochs: int | None = None, show_progress: bool = True) -> TrainResult:
        """Per epoch: train on every training slide, recalibrate BatchNorm where asked, then (rank 0)
        `end_epoch`: validate, checkpoint, log, and decide whether to stop."""
        rt = self.runtime
        for epoch in range(self.progress.epoch + 1, self.cfg.train.epochs + 1):
            t0 = time.perf_counter()
            if self.distiller is not None:
                self.distiller.choose_selector(self, epoch)
            row = self.train_epoch(epoch, show_progress=show_progress)
            if self.calibration:
                # on every rank, on the same slides: selection on each rank uses its own running statistics
                self.recalibrate()
            stop = self.end_epoch(row, t0) if rt.dist.is_main else False
            stop = broadcast_flag(stop, rt.dist, rt.device)
            barrier(rt.dist)
            if stop or (stop_after_epochs is not None and epoch >= stop_after_epochs):
                break
        history: list[dict[str, Any]] = []
        if self.metrics_log is not None:
            self.metrics_log.plot()
            history = self.metrics_log.rows
        p = self.progress
        return TrainResult(
            self.run_dir, history, p.best, self.inputs.monitor, self.micro_batch_size, p.stop_reason
        )

    def train_epoch(self, epoch: int, *, show_progress: bool = False) -> dict[str, Any]:
        """One pass over the training slides: per global batch, select on this rank's slides, then step.
        Returns the epoch's row: train loss, learning rate and train metrics."""
        cfg, rt, records = self.cfg, self.runtime, self.inputs.train
        order = epoch_order(len(records), cfg.train.seed, epoch, rt.dist.world_size)
        transform = make_augment(
            cfg.data, torch.Generator(device=rt.device).manual_seed(cfg.train.seed * 1000 + epoch)
        )
        logits: dict[str, list[torch.Tensor]] = {t.name: [] for t in cfg.model.tasks}
        targets: dict[str, list[torch.Tensor]] = {t.name: [] for t in cfg.model.tasks}
        loss_sum, n_seen = 0.0, 0
        batches = [order[i : i + cfg.train.batch_size] for i in range(0, len(order), cfg.train.batch_size)]
        bar = progress_bar(
            len(batches), f"epoch {epoch}/{cfg.train.epochs}", show_progress and rt.dist.is_main
        )
        for global_batch in batches:
            mine = [records[i] for i in shard(global_batch, rt.dist)]
            batch = self.selected_batch(mine, [cfg.train.seed, epoch, *global_batch, rt.dist.rank])
            frozen = epoch <= cfg.train.freeze_encoder_epochs
            loss, batch_logits = self.step(batch, len(global_batch), frozen=frozen, transform=transform)
            loss_sum += loss * len(mine)
            n_seen += len(mine)
            for name in logits:
                logits[name].append(batch_logits[name])
                targets[name].append(batch.targets[name])
            if bar is not None:
                postfix = {"loss": f"{loss:.3f}", "lr": f"{self.scheduler.get_last_lr()[-1]:.2e}"}
                if rt.device.type == "cuda":
                    postfix["mem"] = f"{torch.cuda.max_memory_allocated(rt.device) / GB:.2f}G"
                bar.set_postfix(postfix)
                bar.update(1)
        if bar is not None:
            bar.close()
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": loss_sum / max(1, n_seen),
            "lr": self.scheduler.get_last_lr()[-1],
        }
        metrics = evaluate_logits(
            cfg.model.tasks,
            {k: torch.cat(v) for k, v in logits.items()},
            {k: torch.cat(v).cpu() for k, v in targets.items()},
        )
        row.update({f"train_{k}": v for k, v in metrics.items() if k != "loss"})
        return row

    def selected_batch(self, records: Sequence[SlideRecord], seed: Sequence[int]) -> SelectedBatch:
        """The slides' training selections (`explore_selections`) and, on annotated slides,
        `train.annotation_slots` annotated ones; stacked with their targets (and patch targets). All
        draws come from one generator seeded with `seed`."""
        cfg = self.cfg
        sources = [self.sources(r) for r in records]
        rng = np.random.default_rng(list(seed))
        bags = (
            [BagEmbeddings(len(src), cfg.train.bag_cap, rng) for src in sources]
            if cfg.train.bag_weight
            else None
        )
        selections = explore_selections(
            self.model, sources, self.selector, cfg.selection, rng, observers=bags
        )
        if self.distiller is not None:
            self.distiller.step(sources, selections, rng)
        patch_targets: list[np.ndarray | None] = [None] * len(records)
        for i, r in enumerate(records):
            labels = self.inputs.annotations.get(r.slide_id)
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
        targets = targets_for(records, cfg.model.tasks)
        batch = stack_selections(selections, targets, cfg.selection.memory_size, patch_targets)
        if bags is not None:
            batch.bags = tuple(b.embeddings() for b in bags)
        return batch

    def step(
        self,
        batch: SelectedBatch,
        global_batch_size: int,
        *,
        frozen: bool = False,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[float, dict[str, torch.Tensor]]:
        """One optimiser step on this rank's share of a global batch (micro-batched, exact); the encoder
        without updates when `frozen`. Returns the mean loss and the logits (`accumulate_gradients`)."""
        model, rt, train_cfg = self.model, self.runtime, self.cfg.train
        model.train()
        set_encoder_frozen(model, frozen, toggle_grad=not rt.dist.enabled)
        self.optimizer.zero_grad(set_to_none=True)
        loss, logits = accumulate_gradients(
            self.net,
            batch,
            self.cfg.model.tasks,
            micro_batch_size=self.micro_batch_size,
            device=rt.device,
            autocast_dtype=rt.autocast_dtype,
            no_sync=rt.dist.enabled,
            transform=transform,
            normalizer=global_batch_size / rt.dist.world_size,
            annotation_weight=train_cfg.annotation_weight,
            bag_weight=train_cfg.bag_weight,
        )
        if frozen:  # under DDP the encoder still gets gradients (all ranks must reduce the same set)
            for p in model.encoder.parameters():
                p.grad = None
        if train_cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss, logits

    def recalibrate(self) -> None:
        """Re-estimate BatchNorm statistics (`ips.training.batchnorm`) over the top-M selections of the
        calibration slides, one forward per chunk (a chunk: the slides of one training micro-batch)."""
        m = self.cfg.selection.memory_size
        batches = (
            stack_selections([self.selector(self.model, self.sources(r)) for r in chunk], {}, m)
            for chunk in self.calibration
        )
        recalibrate_batchnorm(
            self.model, batches, device=self.runtime.device, autocast_dtype=self.runtime.autocast_dtype
        )

    # --- the end of an epoch (rank 0) ---------------------------------------------------------------

    def end_epoch(self, row: dict[str, Any], t0: float) -> bool:
        """The one place an epoch ends (rank 0): validate, checkpoint, log, then the checks that may stop
        the run (`epoch_hooks`, then early stopping). True: stop; `progress.stop_reason` says why."""
        rt, p, monitor = self.runtime, self.progress, self.inputs.monitor
        if self.inputs.val:
            row.update({f"val_{k}": v for k, v in self.validate().items()})
        row["seconds"] = time.perf_counter() - t0
        if rt.device.type == "cuda":
            row["peak_device_gb"] = torch.cuda.max_memory_allocated(rt.device) / GB
        improved = _monitor_better(monitor, row[monitor], p.best)
        if improved:
            p.best, p.bad_epochs = row[monitor], 0
        else:
            p.bad_epochs += 1
        p.epoch = row["epoch"]
        self.save_checkpoints(row, improved)
        if self.metrics_log is not None:
            self.metrics_log.append(row)
        self.log(_summary(row, self.cfg))
        for hook in self.epoch_hooks:
            p.stop_reason = hook(self, row)
            if p.stop_reason is not None:
                self.log(f"stopping: {p.stop_reason}")
                return True
        patience = self.cfg.train.early_stopping_patience
        if patience is not None and p.bad_epochs >= patience:
            p.stop_reason = f"early stopping: {monitor} did not improve for {patience} epochs"
            self.log(p.stop_reason)
            return True
        return False

    def validate(self) -> dict[str, float]:
        """The metrics of the val slides' top-M predictions (`validation_logits`)."""
        tasks = self.cfg.model.tasks
        return evaluate_logits(tasks, self.validation_logits(), targets_for(self.inputs.val, tasks))

    def validation_logits(self) -> dict[str, torch.Tensor]:
        """Per-task logits `{task: (S, n_out)}` of the val slides, from the `Predictor`: the numbers
        `ips predict` gives for the same checkpoint and slides."""
        return self.predictor.predict_sources(self.sources(r) for r in self.inputs.val)

    def save_checkpoints(self, row: dict[str, Any], improved: bool) -> None:
        """`last.pt` (resumable: optimiser, schedule, RNG, progress) and, when the monitored metric
        improved, `best.pt`."""
        p, cfg = self.progress, self.cfg
        extra = {"best": p.best, "bad_epochs": p.bad_epochs, "monitor": self.inputs.monitor}
        if self.distiller is not None:  # the coarse scorer's own optimiser: a resumed run goes on the same
            extra["cascade_optimizer"] = self.distiller.optimizer.state_dict()
        checkpoints = self.run_dir / "checkpoints"
        save_checkpoint(
            checkpoints / "last.pt",
            model=self.model,
            config=cfg,
            epoch=row["epoch"],
            metrics=row,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            extra=extra,
        )
        if improved:
            save_checkpoint(
                checkpoints / "best.pt",
                model=self.model,
                config=cfg,
                epoch=row["epoch"],
                metrics=row,
                extra=extra,
            )

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a `last.pt` payload: weights, optimiser, schedule, RNG, progress, metrics rows."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])  # its length comes from this run's train.epochs
        set_rng_state(state["rng"])
        extra = state["extra"]
        if self.distiller is not None and "cascade_optimizer" in extra:
            self.distiller.optimizer.load_state_dict(extra["cascade_optimizer"])
        self.progress = Progress(state["epoch"], extra.get("best"), extra.get("bad_epochs", 0))
        if self.metrics_log is not None:
            self.metrics_log.truncate(self.progress.epoch)


# --- what the trainer is built from -------------------------------------------------------------------


def epoch_order(n: int, seed: int, epoch: int, world_size: int = 1) -> list[int]:
    """The slide order of an epoch, from (seed, epoch) alone; padded by repetition to a multiple of the
    world size so that every rank gets an equal share of every global batch."""
    order = np.random.default_rng([seed, epoch]).permutation(n).tolist()
    while len(order) % world_size:
        order.append(order[len(order) % n])
    return order


def param_groups(model: IPSModel, *, lr: float, encoder_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups: the encoder at `lr * encoder_lr_scale` (a pretrained encoder fine-tunes slower),
    the rest (projection, aggregator, heads) at `lr`. The schedule scales both alike."""
    enc = list(model.encoder.parameters())
    ids = {id(p) for p in enc}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [
        {"params": enc, "lr": lr * encoder_lr_scale, "name": "encoder"},
        {"params": rest, "lr": lr, "name": "head"},
    ]


def make_optimizer(
    model: IPSModel, train_cfg: TrainConfig, n_train: int, world_size: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with linear warm-up and cosine decay over `train.epochs` (one step per global batch)."""
    groups = param_groups(model, lr=train_cfg.lr, encoder_lr_scale=train_cfg.encoder_lr_scale)
    optimizer = torch.optim.AdamW(groups, weight_decay=train_cfg.weight_decay)
    padded_n = len(epoch_order(n_train, train_cfg.seed, 0, world_size))
    steps_per_epoch = math.ceil(padded_n / train_cfg.batch_size)
    warmup = int(round(train_cfg.warmup_epochs * steps_per_epoch))
    scheduler = warmup_cosine_schedule(
        optimizer, warmup_steps=warmup, total_steps=steps_per_epoch * train_cfg.epochs
    )
    return optimizer, scheduler


def make_augment(
    data: DataConfig, generator: torch.Generator
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Training-time augmentation of `(b, M, C, *S)` uint8 patches on the device -> float in [0, 1]."""
    if not data.augment or data.mode == "features":
        return None
    from ips.data.augment import PatchAugment

    augment = PatchAugment.from_config(data)

    def transform(patches: torch.Tensor) -> torch.Tensor:
        flat = patches.flatten(0, 1)
        return augment(unit_pixels(flat), generator).unflatten(0, patches.shape[:2])

    return transform


def set_encoder_frozen(model: IPSModel, frozen: bool, *, toggle_grad: bool = True) -> None:
    """Warm-up stage (`train.freeze_encoder_epochs`): the encoder in eval mode (BatchNorm statistics fixed)
    and, where `toggle_grad`, without gradients (no backward through it); the reverse when not `frozen`.
    Call after `model.train()`."""
    if frozen:
        model.encoder.eval()
    if toggle_grad:
        for p in model.encoder.parameters():
            p.requires_grad_(not frozen)


def calibration_chunks(
    model: IPSModel, train_records: Sequence[SlideRecord], train_cfg: TrainConfig, micro: int
) -> list[list[SlideRecord]]:
    """The BatchNorm recalibration set: fixed for the run, in micro-batches as training normalises them."""
    n = train_cfg.bn_recalibration_slides if batchnorm_layers(model) else 0
    pick = np.sort(np.random.default_rng(train_cfg.seed).permutation(len(train_records))[:n])
    return [[train_records[i] for i in pick[j : j + micro]] for j in range(0, len(pick), micro)]


def choose_micro_batch(
    model: IPSModel,
    source: PatchSource,
    record: SlideRecord,
    cfg: ExperimentConfig,
    rt: Runtime,
    log: Callable[[str], None],
) -> int:
    """Slides per forward on this rank: `train.micro_batch_size`, else the budget planner's (measured on
    `record`'s `source`), else all."""
    local_batch = cfg.train.batch_size // rt.dist.world_size
    micro = cfg.train.micro_batch_size or local_batch
    if cfg.train.vram_budget_gb is not None:
        plan = plan_budget(model, source, record, cfg, rt)
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
    survival = [t.name for t in cfg.model.tasks if t.kind == "survival" and t.loss != "discrete"]
    if survival and micro < cfg.train.batch_size:
        log(
            f"note: survival task {survival[0]!r}: the Cox risk set is the {micro} slides of a micro-batch "
            f"(on one rank), not the batch of {cfg.train.batch_size}; a larger train.micro_batch_size "
            "compares more slides per step"
        )
    return micro


def plan_budget(
    model: IPSModel, source: PatchSource, record: SlideRecord, cfg: ExperimentConfig, rt: Runtime
) -> BudgetPlan:
    """Measure (CUDA) or estimate (CPU) one step's memory at k slides; choose the micro-batch."""
    assert cfg.train.vram_budget_gb is not None
    selector = Selector.from_config(cfg.selection, rt)
    sel = selector(model, source)
    targets1 = targets_for([record], cfg.model.tasks)
    tasks = cfg.model.tasks

    def batch_of(k: int) -> SelectedBatch:
        targets = {n: t.repeat(k, *[1] * (t.ndim - 1)) for n, t in targets1.items()}
        return stack_selections([sel] * k, targets, cfg.selection.memory_size)

    def cost(k: int) -> int:
        batch = batch_of(k)
        if rt.device.type == "cuda":
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(rt.device)
            selector(model, source)  # the selection pass is part of the step's peak
            accumulate_gradients(
                model, batch, tasks, micro_batch_size=k, device=rt.device, autocast_dtype=rt.autocast_dtype
            )
            peak = torch.cuda.max_memory_allocated(rt.device)
            model.zero_grad(set_to_none=True)
            return int(peak)

        def step() -> torch.Tensor:
            b = batch.to(rt.device)
            logits, _ = model(b.patches, b.positions, b.mask)
            return total_loss(tasks, logits, b.targets).sum()

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


def _monitor_better(monitor: str, new: float, best: float | None) -> bool:
    if math.isnan(new):
        return False
    if best is None:
        return True
    return new < best if lower_is_better(monitor) else new > best


def _summary(row: dict[str, Any], cfg: ExperimentConfig) -> str:
    parts = [f"epoch {row['epoch']}", f"train_loss {row['train_loss']:.4f}"]
    if "val_loss" in row:
        parts.append(f"val_loss {row['val_loss']:.4f}")
        for t in cfg.model.tasks:
            first = "mae" if t.kind == "regression" else "accuracy"
            shown = [first] if t.kind != "survival" else []
            parts.append(
                f"{t.name}: "
                + " ".join(
                    f"{m.replace('accuracy', 'acc')} {row.get(f'val_{t.name}/{m}', float('nan')):.3f}"
                    for m in [*shown, TAKEOFF_METRIC[t.kind]]
                )
            )
    parts.append(f"{row['seconds']:.1f}s")
    return " | ".join(parts)
