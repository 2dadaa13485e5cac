"""Small stores and untrained checkpoints for the inference, heatmap and predict tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from data_prep.convert import PrepOptions, convert_array
from ips.config import ExperimentConfig
from ips.model.checkpoint import save_checkpoint
from ips.model.ips_model import build_model

BINARY = {"name": "a", "kind": "binary"}
MULTICLASS = {"name": "b", "kind": "multiclass", "num_classes": 3}
MULTILABEL = {"name": "c", "kind": "multilabel", "num_classes": 2}


def tiny_cfg(
    *,
    in_chans: int = 3,
    patch: int = 16,
    dims: int = 2,
    tasks: list[dict[str, Any]] | None = None,
    memory_size: int = 4,
    iter_size: int = 16,
    **model: Any,
) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "model": {
                "encoder": "ips_cnn_tiny",
                "in_chans": in_chans,
                "patch_size": patch,
                "spatial_dims": dims,
                "d_model": 32,
                "n_heads": 4,
                "d_mlp": 32,
                "tasks": tasks or [BINARY],
                **model,
            },
            "selection": {"memory_size": memory_size, "iter_size": iter_size, "prefetch": 1},
            "data": {"augment": False, "read_threads": 1},
            "train": {"device": "cpu"},
        }
    )


def write_checkpoint(path: Path, cfg: ExperimentConfig, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    save_checkpoint(path, model=build_model(cfg.model), config=cfg, epoch=0, metrics={})
    return path


def make_store(
    out: Path,
    slide_id: str,
    *,
    size: tuple[int, ...] = (128, 96),
    channels: int = 3,
    patch: int = 16,
    level: int = 0,
    seed: int = 0,
    spacing: tuple[float, ...] | None = None,
    background: int = 255,
    fill: float = 1.0,
    **options: Any,
) -> Path:
    """A store over random pixels (a `fill` share of the image; the rest background) whose grid covers
    the whole image (mask all ones), patches of `patch` pixels at pyramid `level`."""
    rng = np.random.default_rng(seed)
    img = np.full((channels, *size), background, dtype=np.uint8)
    if fill > 0:
        n = max(1, int(round(size[-2] * fill)))
        img[..., :n, :] = rng.integers(0, 255, (channels, *size[:-2], n, size[-1]), dtype=np.uint8)
    opts = PrepOptions(
        patch_size=patch,
        level=level,
        min_tissue=0.0,
        thumbnail=False,
        hash_source=False,
        threads=1,
        **options,
    )
    return convert_array(
        img,
        out,
        slide_id,
        spacing=spacing,
        options=opts,
        background=background,
        mask=np.ones(size, dtype=bool),
    )
