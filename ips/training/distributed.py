"""Multi-process training with torchrun: each rank selects for its own share of every global batch."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ips.runtime import DistInfo


def init_distributed(device_type: str) -> DistInfo:
    """Initialise from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shard(items: list, info: DistInfo) -> list:
    """This rank's share of one global batch (strided, so shares differ by at most one)."""
    return items[info.rank :: info.world_size]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def collective_device(backend: str, device: torch.device) -> torch.device:
    """Where a collective's tensors must live: NCCL only takes CUDA tensors (this rank's GPU); gloo
    takes CPU tensors."""
    if backend == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device | None = None) -> bool:
    """Rank 0's decision (e.g. early stopping) for every rank; `device`: this rank's training device."""
    if not info.enabled:
        return flag
    where = collective_device(dist.get_backend(), device or torch.device("cpu"))
    t = torch.tensor([int(flag)], device=where)
    dist.broadcast(t, 0)
    return bool(t.item())


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
