"""What the entry point decides and modules never do: device, precision, seeds, threads,
and this process's place among distributed ranks."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ips.errors import ConfigError

if TYPE_CHECKING:
    from ips.config import TrainConfig


@dataclass(frozen=True)
class DistInfo:
    """This process's rank among `world_size` (torchrun); the defaults are a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class Runtime:
    """What the entry point decided: device, precision, distribution. Built once per run
    (`Runtime.create`, `Runtime.from_config`); modules take the device and dtype from it, never decide."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None
    dist: DistInfo = DistInfo()

    @classmethod
    def create(
        cls, device: str = "auto", *, amp: bool = True, dist: DistInfo | None = None, key: str = "--device"
    ) -> Runtime:
        """The device named (`resolve_device`; under torchrun, CUDA means this rank's GPU) and the one
        precision rule: bf16 autocast on CUDA when `amp`, full precision otherwise. `key` names the
        option or config key in errors."""
        dist = dist or DistInfo()
        dev = resolve_device(device, key=key)
        if dev.type == "cuda" and dist.enabled:
            dev = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(dev)
        return cls(dev, autocast_dtype_for(dev, amp=amp), dist)

    @classmethod
    def from_config(cls, train: TrainConfig, dist: DistInfo | None = None) -> Runtime:
        """From `cfg.train`: `train.device` and `train.amp`."""
        return cls.create(train.device, amp=train.amp, dist=dist, key="train.device")

    def autocast(self) -> torch.autocast:
        """The autocast context of this runtime (disabled in full precision)."""
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        )

    @property
    def pin_memory(self) -> bool:
        """Pin host buffers for asynchronous copies (CUDA only)."""
        return self.device.type == "cuda"


def autocast_dtype_for(device: torch.device, *, amp: bool = True) -> torch.dtype | None:
    """The precision rule: bf16 autocast on CUDA when `amp`; None (full precision) elsewhere."""
    return torch.bfloat16 if (amp and device.type == "cuda") else None


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """`auto` -> CUDA when available, else CPU; ConfigError naming `key` (the config key or option that
    asked) for CUDA without CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {name!r} asked for but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_threads() -> int:
    """torch CPU threads when `--threads` is not given: half the cores, at most 4.

    torch's own default (one per core) makes small ops wait on each other whenever another process holds
    a core, which slowed the demo many times over on a busy 2-core machine; half the cores keeps most of
    the gain on an idle one.
    """
    return max(1, min(4, (os.cpu_count() or 1) // 2))


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None: `default_threads()`; 0: torch's own default); returns the count
    set (0 for torch's default). ConfigError (exit 2) for a negative count."""
    if threads is None:
        threads = default_threads()
    if threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    return threads
