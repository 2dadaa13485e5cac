"""The pretraining loop: resumable (a state file per epoch: weights, optimizer, scheduler, RNG, losses).

`pretrain_encoder` builds one `Pretrainer`, which holds the run's state, and runs its epochs; it shares
the schedule (`ips.training.schedule`) and the run log and progress bar (`ips.training.runlog`) with
training."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ips.config import ConfigError, ExperimentConfig
from ips.data.sources import PatchSource
from ips.infer.engine import check_model_fits
from ips.model.checkpoint import rng_state, set_rng_state
from ips.model.encoders import DEFAULT_NORM
from ips.model.ips_model import build_model, normalize_pixels, unit_pixels
from ips.model.torchfile import read_torch_file, save_torch_file
from ips.pretrain.augment import ViewAugment
from ips.pretrain.methods import RotationHead, SimCLRHead, nt_xent, quarter_turns
from ips.pretrain.sampler import StorePatchSampler
from ips.runtime import resolve_device
from ips.training.runlog import progress_bar, write_loss_log
from ips.training.schedule import warmup_cosine_schedule

ENCODER_FILE = "encoder.pt"
ENCODER_META = "encoder.json"
STATE_FILE = "state.pt"
_STATE_KEYS = ("fingerprint", "encoder", "head", "optimizer", "scheduler", "rng", "epoch", "losses")


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
    save_torch_file(obj, path)  # a failed write (a full disk) is one line naming the file


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
    if cfg.data.mode != "pixels" or cfg.model.encoder == "features":
        raise ConfigError("data.mode: pretraining needs pixel patches (data.mode pixels, an image encoder)")
    run = Pretrainer.create(cfg, stores, Path(out_dir), device=resolve_device(device, key="--device"))
    state_path = run.out / STATE_FILE
    if resume and state_path.is_file():
        run.resume(state_path)
        log(f"resumed pretraining from {state_path} after epoch {run.epoch}")
    t_all = time.perf_counter()
    for epoch in range(run.epoch + 1, cfg.pretrain.epochs + 1):
        t0 = time.perf_counter()
        run.losses.append(run.run_epoch(epoch, show_progress=show_progress))
        run.epoch = epoch
        run.save()
        log(
            f"pretrain epoch {epoch}/{cfg.pretrain.epochs} | {run.method} loss {run.losses[-1]:.4f} | "
            f"{time.perf_counter() - t0:.1f}s"
        )
        if stop_after_epochs is not None and epoch >= stop_after_epochs:
            break
    if not math.isfinite(run.losses[-1] if run.losses else 0.0):
        raise FloatingPointError("pretraining diverged")
    return {
        "losses": run.losses,
        "encoder": run.out / ENCODER_FILE,
        "method": run.method,
        "seconds": time.perf_counter() - t_all,
    }


def _sources(cfg: ExperimentConfig, stores: Sequence[str | Path]) -> list[PatchSource]:
    """A patch source per store, each checked against the model (ConfigError naming the store)."""
    from ips.data.zarr_source import ZarrPatchSource

    sources: list[PatchSource] = []
    for s in stores:
        src = ZarrPatchSource(s, grid=cfg.data.grid, read_threads=min(2, cfg.data.read_threads))
        check_model_fits(src, cfg.model, features=False, where=f"store {s}")
        sources.append(src)
    return sources


@dataclasses.dataclass
class Pretrainer:
    """One pretraining run's state: the config and output folder, the method, the encoder and its
    pretext head with their optimiser and schedule, the patch stream and the views (`mean`, `std`: the
    model's pixel normalisation), and the progress (`epoch` done, per-epoch `losses`)."""

    cfg: ExperimentConfig
    out: Path
    method: str
    encoder: nn.Module
    head: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: StorePatchSampler
    view: ViewAugment
    mean: torch.Tensor
    std: torch.Tensor
    epoch: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)

    @classmethod
    def create(
        cls, cfg: ExperimentConfig, stores: Sequence[str | Path], out: Path, *, device: torch.device
    ) -> Pretrainer:
        """Check the stores, build the encoder (seeded by `pretrain.seed`) and head on `device`."""
        pc = cfg.pretrain
        method = pc.resolved_method(cfg.model.spatial_dims)
        out.mkdir(parents=True, exist_ok=True)
        sampler = StorePatchSampler(
            _sources(cfg, stores),
            batch_size=pc.batch_size,
            per_slide=pc.patches_per_slide,
            oversample=pc.content_oversample,
        )
        torch.manual_seed(pc.seed)
        model = build_model(dataclasses.replace(cfg.model, pretrained=False))
        encoder = model.encoder.to(device)
        head_cls = (
            SimCLRHead(encoder.out_dim, pc.proj_dim) if method == "simclr" else RotationHead(encoder.out_dim)
        )
        head = head_cls.to(device)
        optimizer = torch.optim.AdamW(
            [*encoder.parameters(), *head.parameters()], lr=pc.lr, weight_decay=pc.weight_decay
        )
        total = cls.steps_per_epoch_of(cfg) * pc.epochs
        warmup = min(cls.steps_per_epoch_of(cfg), total // 10)
        scheduler = warmup_cosine_schedule(optimizer, warmup_steps=warmup, total_steps=total)
        he = cfg.model.in_chans == 3 and cfg.model.spatial_dims == 2
        view = ViewAugment(
            he=he, strength=pc.augment_strength, orientation=method == "simclr" and pc.orientation
        )
        mean, std = model.pixel_mean.to(device), model.pixel_std.to(device)
        return cls(
            cfg=cfg,
            out=out,
            method=method,
            encoder=encoder,
            head=head,
            optimizer=optimizer,
            scheduler=scheduler,
            sampler=sampler,
            view=view,
            mean=mean,
            std=std,
        )

    @staticmethod
    def steps_per_epoch_of(cfg: ExperimentConfig) -> int:
        return cfg.pretrain.patches_per_epoch // cfg.pretrain.batch_size

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def run_epoch(self, epoch: int, *, show_progress: bool = False) -> float:
        """One pretraining epoch over `steps_per_epoch` sampled batches; its mean loss."""
        pc, steps = self.cfg.pretrain, self.steps_per_epoch_of(self.cfg)
        params = [*self.encoder.parameters(), *self.head.parameters()]
        gen = torch.Generator().manual_seed(pc.seed * 1000 + epoch)
        self.encoder.train()
        self.head.train()
        total_loss, n = 0.0, 0
        bar = progress_bar(steps, f"pretrain {epoch}/{pc.epochs}", show_progress)
        for batch in self.sampler.batches(steps, pc.seed, epoch):
            loss = self.loss(unit_pixels(batch.to(self.device)), gen)  # (b, C, *S) in [0, 1]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite pretraining loss {loss.item()} in epoch {epoch}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 3.0)
            self.optimizer.step()
            self.scheduler.step()
            total_loss += loss.item()
            n += 1
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update(1)
        if bar is not None:
            bar.close()
        return total_loss / max(1, n)

    def loss(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The pretext loss of one batch of patches `x (b, C, *S)` in [0, 1]: SimCLR's NT-Xent between
        two views, or cross-entropy of the predicted quarter turn."""
        encoder, head, view = self.encoder, self.head, self.view
        if self.method == "simclr":
            v1, v2 = view(x, gen), view(x, gen)
            z = head(encoder(normalize_pixels(torch.cat([v1, v2]), self.mean, self.std)))  # (2b, P)
            return nt_xent(z[: len(x)], z[len(x) :], self.cfg.pretrain.temperature)
        v, k = quarter_turns(view(x, gen), gen)
        return torch.nn.functional.cross_entropy(head(encoder(normalize_pixels(v, self.mean, self.std))), k)

    def save(self) -> None:
        """After each epoch: encoder.pt and encoder.json (usable at once), the resumable state, the loss log."""
        out, cfg = self.out, self.cfg
        _atomic_save({k: v.detach().cpu() for k, v in self.encoder.state_dict().items()}, out / ENCODER_FILE)
        (out / ENCODER_META).write_text(json.dumps(encoder_meta(cfg, self.method), indent=1))
        state = {
            "epoch": self.epoch,
            "losses": self.losses,
            "encoder": self.encoder.state_dict(),
            "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "fingerprint": _fingerprint(cfg),
        }
        _atomic_save(state, out / STATE_FILE)
        write_loss_log(out, self.losses, f"{self.method} pretraining of {cfg.model.encoder}")

    def resume(self, state_path: Path) -> None:
        """Restore an interrupted pretraining; ConfigError when it was started with another config."""
        state = read_torch_file(
            state_path, what="pretraining state", keys=_STATE_KEYS, map_location=self.device
        )
        if state["fingerprint"] != _fingerprint(self.cfg):
            raise ConfigError(
                f"{state_path.parent}: pretraining there was started with a different config (model, "
                "pretrain or data.grid); use a new --out or --overwrite"
            )
        self.encoder.load_state_dict(state["encoder"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.epoch, self.losses = int(state["epoch"]), [float(v) for v in state["losses"]]
