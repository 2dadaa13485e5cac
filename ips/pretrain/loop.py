"""The pretraining loop: resumable (a state file per epoch: weights, optimizer, scheduler, RNG, losses)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ips.config import ConfigError, ExperimentConfig
from ips.model.checkpoint import rng_state, set_rng_state
from ips.model.encoders import DEFAULT_NORM
from ips.model.ips_model import normalize_pixels, unit_pixels
from ips.pretrain.augment import ViewAugment
from ips.pretrain.methods import RotationHead, SimCLRHead, decorrelation, nt_xent, quarter_turns
from ips.pretrain.sampler import StorePatchSampler

ENCODER_FILE = "encoder.pt"
ENCODER_META = "encoder.json"
STATE_FILE = "state.pt"


def encoder_meta(cfg: ExperimentConfig, method: str) -> dict[str, Any]:
    """What a pretrained encoder file fits: checked by `ips.encoders.build_encoder` when it is loaded."""
    m = cfg.model
    return {
        "format": "ips-pretrained-encoder-1",
        "encoder": m.encoder,
        "encoder_norm": m.encoder_norm or DEFAULT_NORM,
        "in_chans": m.in_chans,
        "spatial_dims": m.spatial_dims,
        "patch_size": m.patch_size,
        "method": method,
    }


def _fingerprint(cfg: ExperimentConfig) -> dict[str, Any]:
    """The parts of the config a resumed pretraining must share with the run it resumes."""
    d = cfg.to_dict()
    model = {k: v for k, v in d["model"].items() if k not in ("pretrained", "tasks")}
    return {"model": model, "pretrain": d["pretrain"], "grid": d["data"]["grid"]}


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _plot(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(1, len(losses) + 1), losses, marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pretrain_encoder(
    cfg: ExperimentConfig,
    stores: Sequence[str | Path],
    out_dir: str | Path,
    *,
    device: str = "auto",
    resume: bool = True,
    show_progress: bool = True,
    stop_after_epochs: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Pretrain `cfg.model`'s encoder on the patches of `stores` per `cfg.pretrain`; write into `out_dir`.

    Returns `{"losses": [per-epoch mean], "encoder": Path, "method": str, "seconds": float}`.
    `stop_after_epochs` ends early as if interrupted (tests of resume).
    """
    from ips.model.ips_model import build_model
    from ips.runtime import resolve_device
    from ips.training.loop import warmup_cosine

    if cfg.data.mode != "pixels" or cfg.model.encoder == "features":
        raise ConfigError("data.mode: pretraining needs pixel patches (data.mode pixels, an image encoder)")
    pc = cfg.pretrain
    method = pc.resolved_method(cfg.model.spatial_dims)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device, key="--device")
    sampler = StorePatchSampler(
        _sources(cfg, stores),
        batch_size=pc.batch_size,
        per_slide=pc.patches_per_slide,
        oversample=pc.content_oversample,
    )

    torch.manual_seed(pc.seed)
    model = build_model(dataclasses.replace(cfg.model, pretrained=False))
    encoder = model.encoder.to(dev)
    mean, std = model.pixel_mean.to(dev), model.pixel_std.to(dev)
    head = (
        SimCLRHead(encoder.out_dim, pc.proj_dim) if method == "simclr" else RotationHead(encoder.out_dim)
    ).to(dev)
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=pc.lr, weight_decay=pc.weight_decay)
    steps_per_epoch = pc.patches_per_epoch // pc.batch_size
    total = steps_per_epoch * pc.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, warmup_steps=min(steps_per_epoch, total // 10), total_steps=total)
    )
    he = cfg.model.in_chans == 3 and cfg.model.spatial_dims == 2
    view = ViewAugment(he=he, strength=pc.augment_strength, orientation=method == "simclr" and pc.orientation)

    losses: list[float] = []
    start = 0
    state_path = out / STATE_FILE
    if resume and state_path.is_file():
        start, losses = _resume(state_path, cfg, dev, encoder, head, optimizer, scheduler)
        log(f"resumed pretraining from {state_path} after epoch {start}")

    run = _Pretraining(
        encoder, head, optimizer, scheduler, sampler, view, mean, std, method, pc, steps_per_epoch, dev
    )
    t_all = time.perf_counter()
    for epoch in range(start + 1, pc.epochs + 1):
        t0 = time.perf_counter()
        losses.append(_run_epoch(run, epoch, show_progress))
        _save_epoch(out, cfg, method, epoch, losses, encoder, head, optimizer, scheduler)
        log(
            f"pretrain epoch {epoch}/{pc.epochs} | {method} loss {losses[-1]:.4f} | {time.perf_counter() - t0:.1f}s"
        )
        if stop_after_epochs is not None and epoch >= stop_after_epochs:
            break
    if not math.isfinite(losses[-1] if losses else 0.0):
        raise FloatingPointError("pretraining diverged")
    return {
        "losses": losses,
        "encoder": out / ENCODER_FILE,
        "method": method,
        "seconds": time.perf_counter() - t_all,
    }


def _sources(cfg: ExperimentConfig, stores: Sequence[str | Path]) -> list[Any]:
    """A patch source per store, each checked against the model (ConfigError naming the store)."""
    from ips.data.open import check_source_fits_model
    from ips.data.zarr_source import ZarrPatchSource

    sources = []
    for s in stores:
        src = ZarrPatchSource(s, grid=cfg.data.grid, read_threads=min(2, cfg.data.read_threads))
        check_source_fits_model(src, cfg, f"store {s}")
        sources.append(src)
    return sources


@dataclasses.dataclass
class _Pretraining:
    """What every pretraining epoch uses: the networks and their optimiser, the patch stream and the views
    (`mean`, `std`: the model's pixel normalisation; `pc`: the config's `pretrain` section)."""

    encoder: torch.nn.Module
    head: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: StorePatchSampler
    view: ViewAugment
    mean: torch.Tensor
    std: torch.Tensor
    method: str
    pc: Any
    steps_per_epoch: int
    device: torch.device


def _run_epoch(run: _Pretraining, epoch: int, show_progress: bool) -> float:
    """One pretraining epoch over `run.steps_per_epoch` sampled batches; its mean loss."""
    encoder, head, optimizer, scheduler = run.encoder, run.head, run.optimizer, run.scheduler
    view, mean, std, method, pc = run.view, run.mean, run.std, run.method, run.pc
    steps_per_epoch, dev = run.steps_per_epoch, run.device
    params = [*encoder.parameters(), *head.parameters()]
    gen = torch.Generator().manual_seed(pc.seed * 1000 + epoch)
    encoder.train()
    head.train()
    total_loss, n = 0.0, 0
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=steps_per_epoch, desc=f"pretrain {epoch}/{pc.epochs}", unit="batch", leave=False)
    for batch in run.sampler.batches(steps_per_epoch, pc.seed, epoch):
        x = unit_pixels(batch.to(dev))  # (b, C, *S) in [0, 1]
        if method == "simclr":
            v1, v2 = view(x, gen), view(x, gen)
            h = encoder(normalize_pixels(torch.cat([v1, v2]), mean, std))  # (2b, D)
            z = head(h)
            loss = nt_xent(z[: len(x)], z[len(x) :], pc.temperature)
            if pc.decorrelation:
                loss = loss + pc.decorrelation * decorrelation(h)
        else:
            v, k = quarter_turns(view(x, gen), gen)
            loss = torch.nn.functional.cross_entropy(head(encoder(normalize_pixels(v, mean, std))), k)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite pretraining loss {loss.item()} in epoch {epoch}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        optimizer.step()
        scheduler.step()
        total_loss += loss.item()
        n += 1
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    return total_loss / max(1, n)


def _save_epoch(
    out: Path,
    cfg: ExperimentConfig,
    method: str,
    epoch: int,
    losses: list[float],
    encoder: torch.nn.Module,
    head: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> None:
    """After each epoch: encoder.pt and encoder.json (usable at once), the resumable state, the loss curve."""
    _atomic_save({k: v.detach().cpu() for k, v in encoder.state_dict().items()}, out / ENCODER_FILE)
    (out / ENCODER_META).write_text(json.dumps(encoder_meta(cfg, method), indent=1))
    _atomic_save(
        {
            "epoch": epoch,
            "losses": losses,
            "encoder": encoder.state_dict(),
            "head": head.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "fingerprint": _fingerprint(cfg),
        },
        out / STATE_FILE,
    )
    with (out / "loss.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "loss"])
        w.writerows([(i + 1, v) for i, v in enumerate(losses)])
    _plot(losses, out / "loss.png", f"{method} pretraining of {cfg.model.encoder}")


def _resume(
    state_path: Path,
    cfg: ExperimentConfig,
    dev: torch.device,
    encoder: torch.nn.Module,
    head: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> tuple[int, list[float]]:
    """Restore an interrupted pretraining; ConfigError when it was started with another config."""
    state = torch.load(state_path, map_location=dev, weights_only=True)
    if state["fingerprint"] != _fingerprint(cfg):
        raise ConfigError(
            f"{state_path.parent}: pretraining there was started with a different config (model, pretrain or "
            "data.grid); use a new --out or --no-resume"
        )
    encoder.load_state_dict(state["encoder"])
    head.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["epoch"]), [float(v) for v in state["losses"]]
