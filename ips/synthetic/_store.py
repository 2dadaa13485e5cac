"""Writing generated images as ips stores, with ground truth beside the format's own arrays, and manifests.

Truth lives in the store under `ips_truth/` (a name outside docs/FORMAT.md, so readers ignore it):
per-patch float32 arrays `ips_truth/<name>` `(N,)` aligned with `grids/<grid>/coords`, and the group's
attributes (planted objects, labels). It is added before the store becomes visible: the writer builds the
complete store in a staging folder, the truth is added there, and the folder is then renamed into place.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ips.format import names as sf

TRUTH_GROUP = "ips_truth"
STAGING = ".staging"


def patch_fraction(mask: np.ndarray, patch_size: int) -> np.ndarray:
    """Fraction of each `patch_size` grid cell inside `mask`: `(ceil(H/p), ceil(W/p))` (or 3D) float32.

    Edge cells that stick out of the image count only their pixels inside it.
    """
    p = patch_size
    cells = tuple(-(-s // p) for s in mask.shape)
    padded = np.zeros(tuple(c * p for c in cells), dtype=np.float32)
    padded[tuple(slice(0, s) for s in mask.shape)] = mask
    inside = np.zeros_like(padded)
    inside[tuple(slice(0, s) for s in mask.shape)] = 1.0
    # (G0, p, G1, p, ...) -> sum over the within-cell axes
    split = tuple(x for c in cells for x in (c, p))
    axes = tuple(range(1, 2 * len(cells), 2))
    return (padded.reshape(split).sum(axes) / inside.reshape(split).sum(axes)).astype(np.float32)


def cells_to_grid(cells: np.ndarray, coords: np.ndarray, patch_size: int) -> np.ndarray:
    """Per-cell values `(G0, G1[, G2])` of a stride-`patch_size` grid -> per-patch `(N,)` at `coords (N, d)`."""
    return cells[tuple((coords // patch_size).T)]


def write_store(
    array: np.ndarray,
    out_dir: str | Path,
    slide_id: str,
    *,
    patch_size: int,
    background: int,
    mask: np.ndarray | None,
    min_tissue: float,
    spacing: tuple[float, ...] | None = None,
    truth_cells: Mapping[str, np.ndarray] | None = None,
    truth_attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write `array` `(C, Y, X)` / `(C, Z, Y, X)` uint8 as `out_dir/<slide_id>.zarr` with grid `default`.

    `truth_cells`: name -> per-cell values `(G0, G1[, G2])` over the stride-`patch_size` cells of level 0;
    stored per grid patch as `ips_truth/<name>` `(N,)`. Returns the store's path.
    """
    from data_prep.convert import THUMBNAIL_SUFFIX, PrepOptions, convert_array  # optional at import time

    out_dir = Path(out_dir)
    staging = out_dir / STAGING
    # overwrite: a store left in staging by a killed run may come from other parameters
    options = PrepOptions(
        patch_size=patch_size,
        stride=patch_size,
        level=0,
        min_tissue=min_tissue,
        grid_name=sf.DEFAULT_GRID,
        overwrite=True,
    )
    built = Path(
        convert_array(
            array, staging, slide_id, spacing=spacing, options=options, background=background, mask=mask
        )
    )
    root = zarr.open_group(str(built), mode="r+")
    truth = root.create_group(TRUTH_GROUP, overwrite=True)
    truth.attrs.update(dict(truth_attrs or {}))
    coords = np.asarray(root[f"{sf.GRIDS_GROUP}/{sf.DEFAULT_GRID}/{sf.COORDS_ARRAY}"][...])
    for name, cells in (truth_cells or {}).items():
        values = cells_to_grid(np.asarray(cells, dtype=np.float32), coords, patch_size)
        arr = truth.create_array(
            name, shape=values.shape, dtype="float32", chunks=(max(1, len(values)),), fill_value=0.0
        )
        if len(values):
            arr[...] = values
    final = out_dir / f"{slide_id}.zarr"
    old = out_dir / f".{slide_id}.zarr.old"
    if final.exists():  # replace a previous run's store, as the writer's commit does
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(built, final)
    shutil.rmtree(old, ignore_errors=True)
    thumb = staging / f"{slide_id}{THUMBNAIL_SUFFIX}"
    if thumb.is_file():  # the store's attributes point at ../<slide_id>.thumbnail.png
        os.replace(thumb, out_dir / thumb.name)
    if not any(staging.iterdir()):
        staging.rmdir()
    return final


def write_manifest(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Write a manifest CSV with `columns` (missing cells empty); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    os.replace(tmp, path)
    return path


def stratified_splits(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[str]:
    """A split name (train/val/test) per item, the same share of each label in every split.

    Within each label, items are shuffled with `seed` and cut at the cumulative `fractions`.
    """
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(
            f"split fractions must be 3 non-negative numbers (train, val, test), got {fractions}"
        )
    frac = np.asarray(fractions, dtype=float) / float(sum(fractions))
    rng = np.random.default_rng([seed, 0x5350])
    labels_arr = np.asarray(labels)
    out = [""] * len(labels_arr)
    for lab in np.unique(labels_arr):
        idx = rng.permutation(np.flatnonzero(labels_arr == lab))
        cuts = np.round(np.cumsum(frac)[:-1] * len(idx)).astype(int)
        for name, part in zip(("train", "val", "test"), np.split(idx, cuts)):
            for i in part:
                out[int(i)] = name
    return out
