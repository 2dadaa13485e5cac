"""What `ips predict` and `ips heatmap` share: arguments, model loading, the runtime, per-store checks."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ips.cli._threads import add_threads
from ips.config import ConfigError, ExperimentConfig
from ips.data.manifest import SlideRecord

if TYPE_CHECKING:  # torch is imported when a command runs, not when `ips --help` builds the parser
    import torch

    from ips.model.ips_model import IPSModel


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by `ips train` (e.g. best.pt)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--mode", choices=("topm", "all"), default="topm",
                   help="prediction from the top-M selected patches as trained (default), or from all N "
                        "patches by exact streaming attention")
    add_threads(p)


@dataclass
class Loaded:
    model: IPSModel
    cfg: ExperimentConfig
    device: torch.device
    autocast_dtype: torch.dtype | None


def load(checkpoint: str, device_name: str) -> Loaded:
    """The checkpoint's model on the chosen device, in eval mode; ConfigError (exit 2) if unusable."""
    import torch

    from ips.model.checkpoint import load_model
    from ips.runtime import resolve_device

    device = resolve_device(device_name)
    model, cfg = load_model(checkpoint, device)
    autocast = torch.bfloat16 if (cfg.train.amp and device.type == "cuda") else None
    return Loaded(model, cfg, device, autocast)


def store_records(stores: Sequence[str]) -> list[SlideRecord]:
    """One record per store path, slide_id from its name; ConfigError on a repeated slide id."""
    from ips.infer.heatmap import slide_id_of_store

    records: list[SlideRecord] = []
    seen: dict[str, str] = {}
    for s in stores:
        sid = slide_id_of_store(s)
        if sid in seen:
            raise ConfigError(f"two stores have the slide id {sid!r}: {seen[sid]} and {s}")
        seen[sid] = s
        records.append(SlideRecord(sid, str(Path(s))))
    return records


def one_line(e: BaseException) -> str:
    """An exception as one line: its message (typed for unexpected kinds)."""
    from ips.data.store import StoreError

    text = (str(e).strip().splitlines() or [""])[0]
    return text if isinstance(e, (ConfigError, StoreError)) else f"{type(e).__name__}: {text}"
