"""What the entry point decides and modules never do (STYLE.md #1): device, precision, seeds, threads,
and this process's place among distributed ranks."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from ips.errors import ConfigError


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


@dataclass
class Runtime:
    """What the entry point decided: device, precision, distribution."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    dist: DistInfo


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
