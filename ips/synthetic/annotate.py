"""Annotation masks made from a synthetic set's planted truth, for the benchmark of patch-level guidance.

A seeded share of the train split gets a mask `<store>.annotation.npy`: one pixel per grid cell at the
grid's level, 1 where the planted object covers at least `min_fraction` of the cell (the truth
`ips_truth/<truth>`, `(N,)` shares per grid patch). Negative slides get an empty mask ("nothing here").
The new manifest is the old one plus an `annotation` column (empty for the rows not chosen).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from ips.errors import ManifestError, StoreError


@dataclass(frozen=True)
class Annotated:
    """What `annotate_from_truth` did: slides annotated, training slides, and those with a marked cell."""

    n_annotated: int
    n_train: int
    n_marked: int


def truth_mask(store: Path, truth: str, min_fraction: float) -> np.ndarray:
    """`(H/patch, W/patch)` uint8 mask of the default grid's cells whose truth share >= `min_fraction`."""
    g = zarr.open_group(str(store), mode="r")
    key = f"ips_truth/{truth}"
    if key not in g:
        raise StoreError(f"{store}: no {key} (not a synthetic store, or --truth names another array)")
    coords = np.asarray(g["grids/default/coords"][...])  # (N, 2) level-0 (row, col)
    patch = int(g.attrs["ips"]["grids"]["default"]["patch_size"][0])
    marked = np.asarray(g[key][...]) >= min_fraction  # (N,)
    level0 = g["0"].shape[1:]
    mask = np.zeros([int(np.ceil(s / patch)) for s in level0], dtype=np.uint8)
    cells = coords[marked] // patch
    mask[cells[:, 0], cells[:, 1]] = 1
    return mask


def annotate_from_truth(
    manifest: str | Path, out: str | Path, *, fraction: float, min_fraction: float, truth: str, seed: int
) -> Annotated:
    """Write masks for a seeded `fraction` of `manifest`'s train rows and the new manifest `out`."""
    src = Path(manifest)
    if not src.is_file():
        raise ManifestError(f"{src}: no such manifest")
    with src.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "path" not in rows[0]:
        raise ManifestError(f"{src}: no rows, or no `path` column")
    train = [i for i, r in enumerate(rows) if r.get("split") in ("train", "", None)]
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(train, size=int(round(fraction * len(train))), replace=False).tolist())
    n_marked = 0
    for i, row in enumerate(rows):
        row["annotation"] = ""
        if i not in chosen:
            continue
        store = src.parent / row["path"]
        mask = truth_mask(store, truth, min_fraction)
        n_marked += int(mask.any())
        path = store.with_suffix(".annotation.npy")
        np.save(path, mask)
        row["annotation"] = (
            str(path.relative_to(src.parent)) if path.is_relative_to(src.parent) else str(path)
        )
    with Path(out).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    return Annotated(n_annotated=len(chosen), n_train=len(train), n_marked=n_marked)
