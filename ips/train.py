"""The training loop: per batch of B slides, stream-select per slide, then train on the selections.

The entry point owns device, dtype, autocast and seeds (STYLE.md #1); modules take explicit arguments.
Every epoch's randomness derives from (seed, epoch) and the RNG states saved in the checkpoint, so a
resumed run equals one that was never interrupted.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ips.batchnorm import batchnorm_layers, recalibrate_batchnorm
from ips.budget import GB, BudgetPlan, estimate_step_bytes, plan_micro_batch
from ips.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from ips.config import ConfigError, ExperimentConfig, save_config
from ips.distributed import DistInfo, barrier, broadcast_flag, shard
from ips.manifest import SlideRecord, read_manifest
from ips.metrics import evaluate_logits
from ips.model import IPSModel, build_model
from ips.runlog import MetricsLog
from ips.selection import Selection, eval_mode, explore_selection, select
from ips.sources import PatchSource
from ips.streaming import stream_chunks
from ips.tasks import label_tensor
from ips.train_step import SelectedBatch, accumulate_gradients, stack_selections


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} asked for but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_source(record: SlideRecord, cfg: ExperimentConfig) -> PatchSource:
    """The patch source of one slide: pixels from its grid, or its precomputed features."""
    from ips.zarr_source import FeatureSource, ZarrPatchSource

    if cfg.data.mode == "features":
        return FeatureSource(record.path, features=cfg.data.features)
    return ZarrPatchSource(record.path, grid=cfg.data.grid, read_threads=cfg.data.read_threads)


def check_source_fits_model(source: PatchSource, cfg: ExperimentConfig, where: str) -> None:
    """A store whose patches the model cannot take: a clear error before any training."""
    m = cfg.model
    if cfg.data.mode == "features":
        expected: tuple[int, ...] = (m.feature_dim or 0,)
    else:
        expected = (m.in_chans, *([m.patch_size] * m.spatial_dims))
    if tuple(source.patch_shape) != expected:
        raise ConfigError(
            f"{where}: patches have shape {tuple(source.patch_shape)} but the model expects {expected} "
            f"(model.in_chans, model.patch_size, model.spatial_dims{', model.feature_dim' if m.encoder == 'features' else ''})"
        )
    if len(source) == 0:
        raise ConfigError(f"{where}: the grid has no patches (empty tissue mask?)")


def targets_for(records: Sequence[SlideRecord], cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    return {t.name: label_tensor(t, [r.labels[t.name] for r in records]) for t in cfg.model.tasks}


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


@dataclass
class Runtime:
    """What the entry point decided: device, precision, distribution."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    dist: DistInfo


def select_slides(
    model: IPSModel, sources: Sequence[PatchSource], cfg: ExperimentConfig, rt: Runtime
) -> list[Selection]:
    """One no-grad selection pass per slide, the model in eval mode (restored after)."""
    stream = partial(stream_chunks, prefetch=cfg.selection.prefetch, pin_memory=rt.device.type == "cuda")
    with eval_mode(model):
        return [
            select(model, src, memory_size=cfg.selection.memory_size, iter_size=cfg.selection.iter_size,
                   score=cfg.selection.score, device=rt.device, stream=stream, autocast_dtype=rt.autocast_dtype)
            for src in sources
        ]


@torch.no_grad()
def predict_records(
    model: IPSModel, records: Sequence[SlideRecord], cfg: ExperimentConfig, rt: Runtime,
    progress: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-task logits `{task: (S, n_out)}` of the slides, from their top-M selection (as trained)."""
    out: dict[str, list[torch.Tensor]] = {t.name: [] for t in cfg.model.tasks}
    with eval_mode(model):
        for record in records:
            source = make_source(record, cfg)
            (sel,) = select_slides(model, [source], cfg, rt)
            batch = stack_selections([sel], {}, cfg.selection.memory_size).to(rt.device)
            with torch.autocast(rt.device.type, dtype=rt.autocast_dtype, enabled=rt.autocast_dtype is not None):
                logits, _ = model(batch.patches, batch.positions, batch.mask)
            for name, value in logits.items():
                out[name].append(value.float().cpu())
            if progress:
                progress(1)
    return {k: torch.cat(v) for k, v in out.items()}


def plan_budget(
    model: IPSModel, source: PatchSource, record: SlideRecord, cfg: ExperimentConfig, rt: Runtime
) -> BudgetPlan:
    """Measure (CUDA) or estimate (CPU) one step's memory at k slides; choose the micro-batch."""
    assert cfg.train.vram_budget_gb is not None
    (sel,) = select_slides(model, [source], cfg, rt)
    targets1 = targets_for([record], cfg)

    def batch_of(k: int) -> SelectedBatch:
        return stack_selections([sel] * k, {n: t.repeat(k, *[1] * (t.ndim - 1)) for n, t in targets1.items()},
                                cfg.selection.memory_size)

    def cost(k: int) -> int:
        batch = batch_of(k)
        if rt.device.type == "cuda":
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(rt.device)
            with eval_mode(model):  # the selection pass is part of the step's peak
                select(model, source, memory_size=cfg.selection.memory_size, iter_size=cfg.selection.iter_size,
                       score=cfg.selection.score, device=rt.device, autocast_dtype=rt.autocast_dtype)
            accumulate_gradients(model, batch, cfg.model.tasks, micro_batch_size=k, device=rt.device,
                                 autocast_dtype=rt.autocast_dtype)
            peak = torch.cuda.max_memory_allocated(rt.device)
            model.zero_grad(set_to_none=True)
            return int(peak)

        def step() -> torch.Tensor:
            b = batch.to(rt.device)
            logits, _ = model(b.patches, b.positions, b.mask)
            from ips.tasks import total_loss

            return total_loss(cfg.model.tasks, logits, b.targets).sum()

        return estimate_step_bytes(model, step)

    hint = (f"selection.memory_size (M={cfg.selection.memory_size}), model.patch_size ({cfg.model.patch_size}), "
            f"selection.iter_size (I={cfg.selection.iter_size}) or the encoder ({cfg.model.encoder})")
    # the trial steps run in train mode: keep them from moving BatchNorm running statistics
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
        return plan_micro_batch(cost, budget_bytes=int(cfg.train.vram_budget_gb * GB),
                                batch_size=cfg.train.batch_size, measured=rt.device.type == "cuda", hint=hint)
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])


def recalibrate_from_selections(
    model: IPSModel, chunks: Sequence[Sequence[SlideRecord]], cfg: ExperimentConfig, rt: Runtime
) -> None:
    """Re-estimate BatchNorm statistics (`ips.batchnorm`) over the top-M selections of the slides in
    `chunks`, one forward per chunk (a chunk: the slides of one training micro-batch)."""
    batches = (stack_selections(select_slides(model, [make_source(r, cfg) for r in chunk], cfg, rt), {},
                                cfg.selection.memory_size) for chunk in chunks)
    recalibrate_batchnorm(model, batches, device=rt.device, autocast_dtype=rt.autocast_dtype)


def make_augment(cfg: ExperimentConfig, generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Training-time augmentation of `(b, M, C, *S)` uint8 patches on the device -> float in [0, 1]."""
    if not cfg.data.augment or cfg.data.mode == "features":
        return None
    from ips.augment import PatchAugment

    augment = PatchAugment.from_config(cfg.data)

    def transform(patches: torch.Tensor) -> torch.Tensor:
        flat = patches.flatten(0, 1)
        flat = flat.float() / 255.0 if flat.dtype == torch.uint8 else flat
        return augment(flat, generator).unflatten(0, patches.shape[:2])

    return transform


def param_groups(model: IPSModel, cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """AdamW groups: the encoder at `lr * encoder_lr_scale` (a pretrained encoder fine-tunes slower),
    the rest (projection, aggregator, heads) at `lr`. The schedule scales both alike."""
    enc = list(model.encoder.parameters())
    ids = {id(p) for p in enc}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": enc, "lr": cfg.train.lr * cfg.train.encoder_lr_scale, "name": "encoder"},
            {"params": rest, "lr": cfg.train.lr, "name": "head"}]


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
) -> dict[str, Any]:
    """Train per `cfg` on the slides of `manifest`; write checkpoints, metrics and curves to `run_dir`.

    `stop_after_epochs` ends the run early as if interrupted (tests of resume).
    Returns `{"history": [...], "best": {...}, "run_dir": Path}`.
    """
    dist_info = dist_info or DistInfo()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    autocast_dtype = torch.bfloat16 if (cfg.train.amp and device.type == "cuda") else None
    rt = Runtime(device, autocast_dtype, dist_info)
    if cfg.train.batch_size % dist_info.world_size:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by the number of "
                          f"processes ({dist_info.world_size})")

    # --- everything that can be wrong with the input is checked before training starts
    records = read_manifest(manifest, cfg.model.tasks)
    train_records, val_records = split_records(records)
    if not train_records:
        raise ConfigError(f"{manifest}: no slides in the train split")
    for r in [*train_records, *val_records]:
        check_source_fits_model(make_source(r, cfg), cfg, f"slide {r.slide_id} ({r.path})")

    seed_everything(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    if device.type == "cuda" and cfg.train.channels_last and cfg.model.spatial_dims == 2:
        model = model.to(memory_format=torch.channels_last)
    if dist_info.is_main:
        save_config(cfg, run_dir / "config.yaml")

    local_batch = cfg.train.batch_size // dist_info.world_size
    micro = cfg.train.micro_batch_size or local_batch
    if cfg.train.vram_budget_gb is not None:
        plan = plan_budget(model, make_source(train_records[0], cfg), train_records[0], cfg, rt)
        if cfg.train.micro_batch_size is None:
            micro = plan.micro_batch_size
        log(plan.describe() + ("" if plan.measured else " (no CUDA: an estimate, not enforced)"))
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.train.vram_budget_gb * GB / total), device)
    micro = min(micro, local_batch)  # slides per forward on this rank

    has_bn = bool(batchnorm_layers(model))
    if micro < local_batch and has_bn:
        log(f"note: the encoder has BatchNorm and micro-batches hold {micro} slides: it normalises over each "
            "micro-batch's patches, so gradients are close to, not equal to, full-batch ones")

    net: nn.Module = model
    if dist_info.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.train.weight_decay)
    padded_n = len(epoch_order(len(train_records), cfg.train.seed, 0, dist_info.world_size))
    steps_per_epoch = math.ceil(padded_n / cfg.train.batch_size)
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup = int(round(cfg.train.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, warmup_steps=warmup, total_steps=total_steps)
    )

    metrics_log = MetricsLog(run_dir, tensorboard=False) if dist_info.is_main else None
    start_epoch, best, bad_epochs = 0, None, 0
    last_path, best_path = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
    if resume and last_path.exists():
        state = load_checkpoint(last_path, map_location=device)
        if state["config"] != cfg.to_dict():
            raise ConfigError(f"{run_dir}: the run was started with a different config; use a new --out or "
                              "delete the run directory")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_epoch = state["epoch"]
        best, bad_epochs = state["extra"].get("best"), state["extra"].get("bad_epochs", 0)
        if metrics_log:
            metrics_log.truncate(start_epoch)
        log(f"resumed from {last_path} after epoch {start_epoch}")

    # BatchNorm recalibration set: fixed for the run, in micro-batches as training normalises them
    n_calibration = cfg.train.bn_recalibration_slides if has_bn else 0
    pick = np.sort(np.random.default_rng(cfg.train.seed).permutation(len(train_records))[:n_calibration])
    calibration_chunks = [[train_records[i] for i in pick[j : j + micro]] for j in range(0, len(pick), micro)]

    history = metrics_log.rows if metrics_log else []
    for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        order = epoch_order(len(train_records), cfg.train.seed, epoch, dist_info.world_size)
        aug_gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + epoch)
        transform = make_augment(cfg, aug_gen)
        train_logits: dict[str, list[torch.Tensor]] = {t.name: [] for t in cfg.model.tasks}
        train_targets: dict[str, list[torch.Tensor]] = {t.name: [] for t in cfg.model.tasks}
        loss_sum, n_seen = 0.0, 0
        batches = [order[i : i + cfg.train.batch_size] for i in range(0, len(order), cfg.train.batch_size)]
        bar = _progress(len(batches), f"epoch {epoch}/{cfg.train.epochs}", show_progress and dist_info.is_main)
        for global_batch in batches:
            mine = [train_records[i] for i in shard(global_batch, dist_info)]
            sources = [make_source(r, cfg) for r in mine]
            selections = select_slides(model, sources, cfg, rt)
            if cfg.selection.explore > 0:
                rng = np.random.default_rng([cfg.train.seed, epoch, *global_batch, dist_info.rank])
                selections = [explore_selection(sel, src, fraction=cfg.selection.explore, generator=rng)
                              for sel, src in zip(selections, sources)]
            targets = targets_for(mine, cfg)
            batch = stack_selections(selections, targets, cfg.selection.memory_size)
            model.train()
            frozen = epoch <= cfg.train.freeze_encoder_epochs
            set_encoder_frozen(model, frozen, toggle_grad=not dist_info.enabled)
            optimizer.zero_grad(set_to_none=True)
            loss, logits = accumulate_gradients(
                net, batch, cfg.model.tasks, micro_batch_size=micro, device=device,
                autocast_dtype=autocast_dtype, no_sync=dist_info.enabled, transform=transform,
                normalizer=len(global_batch) / dist_info.world_size,
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
            for name in train_logits:
                train_logits[name].append(logits[name])
                train_targets[name].append(targets[name])
            if bar is not None:
                postfix = {"loss": f"{loss:.3f}", "lr": f"{scheduler.get_last_lr()[-1]:.2e}"}
                if device.type == "cuda":
                    postfix["mem"] = f"{torch.cuda.max_memory_allocated(device) / GB:.2f}G"
                bar.set_postfix(postfix)
                bar.update(1)
        if bar is not None:
            bar.close()
        row: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / max(1, n_seen),
                               "lr": scheduler.get_last_lr()[-1]}
        train_metrics = evaluate_logits(cfg.model.tasks, {k: torch.cat(v) for k, v in train_logits.items()},
                                        {k: torch.cat(v) for k, v in train_targets.items()})
        row.update({f"train_{k}": v for k, v in train_metrics.items() if k != "loss"})
        if calibration_chunks:
            # on every rank, on the same slides: selection on each rank uses its own running statistics
            recalibrate_from_selections(model, calibration_chunks, cfg, rt)
        stop = False
        if dist_info.is_main:
            if val_records:
                val_logits = predict_records(model, val_records, cfg, rt)
                val_metrics = evaluate_logits(cfg.model.tasks, val_logits, targets_for(val_records, cfg))
                row.update({f"val_{k}": v for k, v in val_metrics.items()})
            row["seconds"] = time.perf_counter() - t0
            if device.type == "cuda":
                row["peak_device_gb"] = torch.cuda.max_memory_allocated(device) / GB
            monitor = cfg.train.monitor if cfg.train.monitor in row else "train_loss"
            improved = _monitor_better(monitor, row[monitor], best)
            if improved:
                best, bad_epochs = row[monitor], 0
            else:
                bad_epochs += 1
            extra = {"best": best, "bad_epochs": bad_epochs, "monitor": monitor}
            save_checkpoint(last_path, model=model, config=cfg, epoch=epoch, metrics=row, optimizer=optimizer,
                            scheduler=scheduler, extra=extra)
            if improved:
                save_checkpoint(best_path, model=model, config=cfg, epoch=epoch, metrics=row, extra=extra)
            assert metrics_log is not None
            metrics_log.append(row)
            log(_summary(row, cfg))
            patience = cfg.train.early_stopping_patience
            stop = patience is not None and bad_epochs >= patience
            if stop:
                log(f"early stopping: {monitor} did not improve for {patience} epochs")
        stop = broadcast_flag(stop, dist_info)
        barrier(dist_info)
        if stop or (stop_after_epochs is not None and epoch >= stop_after_epochs):
            break
    if metrics_log is not None:
        metrics_log.plot()
        metrics_log.close()
    return {"history": history, "best": best, "run_dir": run_dir, "micro_batch_size": micro}


def _summary(row: dict[str, Any], cfg: ExperimentConfig) -> str:
    parts = [f"epoch {row['epoch']}", f"train_loss {row['train_loss']:.4f}"]
    if "val_loss" in row:
        parts.append(f"val_loss {row['val_loss']:.4f}")
        for t in cfg.model.tasks:
            parts.append(f"{t.name}: acc {row.get(f'val_{t.name}/accuracy', float('nan')):.3f} "
                         f"auroc {row.get(f'val_{t.name}/auroc', float('nan')):.3f}")
    parts.append(f"{row['seconds']:.1f}s")
    return " | ".join(parts)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False)


def with_overrides(cfg: ExperimentConfig, **sections: dict[str, Any]) -> ExperimentConfig:
    """`cfg` with some fields of some sections replaced, validated again like a YAML file."""
    data = cfg.to_dict()
    for name, values in sections.items():
        data[name] = {**data[name], **values}
    return ExperimentConfig.from_dict(data)
