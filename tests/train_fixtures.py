"""A tiny learnable slide collection for training tests: stores written by the real writer.

Each slide is a 1-channel 64 x 64 image of grey noise in a grid of 8 x 8 patches (64 patches); a
positive slide has `marks` patches, at random places, carrying a checkerboard. The label is 1 iff a
mark is present: learnable only by attending to the right patches.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from data_prep.convert import PrepOptions, convert_array
from ips.config import ExperimentConfig, with_overrides

PATCH = 8
SIZE = 64
# the mark: a 2-px checkerboard with the noise's mean and range (40..120), so that it is not an extreme
# patch that a fresh model ranks consistently first or last; only its structure tells it apart
CHECKER = np.where(
    (np.arange(PATCH)[:, None] // 2 + np.arange(PATCH)[None, :] // 2) % 2 == 0, 40, 120
).astype(np.uint8)


def make_cross_slides(
    out: Path,
    n_train: int,
    n_val: int,
    seed: int = 0,
    size: int = SIZE,
    marks: int = 1,
    mark: str = "checker",
    annotate: float = 0.0,
) -> Path:
    """`mark`: "checker" or "cross". Write `out/<id>.zarr` stores and `out/manifest.csv` (slide_id,path,label,split);
    return the manifest. `annotate`: the share of positive training slides whose marks are given as an
    annotation (a mask `.npy` in the `annotation` column)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    options = PrepOptions(patch_size=PATCH, min_tissue=0.0, thumbnail=False, hash_source=False)
    for i in range(n_train + n_val):
        label = i % 2
        img = rng.integers(40, 120, size=(1, size, size), dtype=np.uint8)
        cells = rng.choice((size // PATCH) ** 2, size=marks * label, replace=False)
        for r, c in zip(*np.divmod(cells, size // PATCH)):
            r, c = r * PATCH, c * PATCH
            if mark == "checker":
                img[0, r : r + PATCH, c : c + PATCH] = CHECKER
            else:  # a bright cross: an extreme patch, which a fresh model may rank consistently last
                img[0, r + 3 : r + 5, c + 1 : c + 7] = 250
                img[0, r + 1 : r + 7, c + 3 : c + 5] = 250
        slide_id = f"s{i:03d}"
        convert_array(img, out, slide_id, options=options, mask=np.ones((size, size), dtype=bool))
        row = {
            "slide_id": slide_id,
            "path": f"{slide_id}.zarr",
            "label": label,
            "split": "train" if i < n_train else "val",
            "annotation": "",
        }
        if annotate and label and i < n_train and rng.random() < annotate:  # no draw unless asked: same data
            truth = np.zeros((size, size), dtype=np.uint8)
            for r, c in zip(*np.divmod(cells, size // PATCH)):
                truth[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = 1
            np.save(out / f"{slide_id}.truth.npy", truth)
            row["annotation"] = f"{slide_id}.truth.npy"
        rows.append(row)
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(
            f,
            fieldnames=["slide_id", "path", "label", "split"] + (["annotation"] if annotate else []),
            extrasaction="ignore",
        )
        writer.writeheader()
        writer.writerows(rows)
    return manifest


# a config small enough that an epoch on `make_cross_slides` data takes well under a second; GroupNorm and
# no exploration (not the library's recipe), as the tests built on it were measured and need: exact
# micro-batching and the same draws on every rank
TINY = {
    "model": {
        "encoder": "ips_cnn_tiny",
        "encoder_norm": "group",
        "in_chans": 1,
        "patch_size": 8,
        "d_model": 32,
        "n_heads": 4,
        "d_mlp": 32,
        "tasks": [{"name": "label", "kind": "binary"}],
    },
    "selection": {"memory_size": 4, "iter_size": 16, "prefetch": 1, "explore": 0.0},
    "data": {"augment": False},
    "train": {"epochs": 3, "batch_size": 4, "lr": 3e-3, "weight_decay": 0.0, "warmup_epochs": 0.5, "seed": 0},
}


def tiny_config(**sections) -> ExperimentConfig:
    return with_overrides(ExperimentConfig.from_dict(TINY), **sections)
