"""What the learnability families share: a rendered item, and a dataset writer that stores it as `ips prep` would.

Every family renders `FamilyItem`s (an image, its label, level-0 truth masks) and `write_family_dataset`
writes them as stores with the prep's own pipeline (`data_prep.convert.convert_array` through
`ips.synthetic._store.write_store`): the tissue mask is computed from the pixels as for a file, the grid is
the prep's default (stride = patch size, prep's minimum tissue fraction), so a family's stores are those
that `ips prep FILES --out S --patch-size P` makes. Truth: `ips_truth/lesion` `(N,)` = share of each patch
inside the target (any further masks under their own names), attributes as given.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ips.synthetic._store import GridSpec, stratified_splits, write_manifest, write_store

SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


@dataclass(frozen=True)
class FamilyItem:
    """One generated slide or volume: `image` `(C, Y, X)` / `(C, Z, Y, X)` uint8, its binary `label`,
    level-0 truth `masks` (name -> bool array of the spatial shape; `lesion` = the target), `attrs`."""

    image: np.ndarray
    label: int
    masks: Mapping[str, np.ndarray]
    attrs: Mapping[str, Any] = field(default_factory=dict)


# render(rng, label, split) -> FamilyItem
Renderer = Callable[[np.random.Generator, int, str], FamilyItem]


def item_rng(seed: int, family: str, index: int) -> np.random.Generator:
    """The generator of item `index` of a family's dataset: independent of how many items are made."""
    return np.random.default_rng([seed, sum(map(ord, family)), index])


def balanced_labels(n: int, seed: int, positive_fraction: float = 0.5) -> np.ndarray:
    """`n` binary labels, `round(n * positive_fraction)` of them 1, in a seeded random order."""
    labels = np.zeros(n, dtype=np.int64)
    labels[: int(round(n * positive_fraction))] = 1
    return np.random.default_rng([seed, 0x4C42]).permutation(labels)


def write_family_dataset(
    out_dir: str | Path,
    *,
    family: str,
    n_slides: int,
    seed: int,
    render: Renderer,
    patch_size: int,
    spacing: tuple[float, ...],
    params: Mapping[str, Any],
    extra_grids: Sequence[GridSpec] = (),
) -> Path:
    """Render `n_slides` items (half positive) and write them as stores under `out_dir/stores/`, with
    `out_dir/manifest.csv` (`slide_id,path,label,split`, splits 60/20/20 stratified by label) and
    `out_dir/family.json` (the parameters). `extra_grids`: further grids in every store (`ips prep --grid-name
    NAME --level L --patch-size P --stride S`), each with its truth. Returns the manifest path."""
    from data_prep.options import PrepOptions  # optional at import time

    if n_slides < 5:
        raise ValueError(f"n_slides must be >= 5 (train, val and test need both labels), got {n_slides}")
    out_dir = Path(out_dir)
    labels = balanced_labels(n_slides, seed)
    splits = stratified_splits(labels.tolist(), SPLIT_FRACTIONS, seed)
    min_tissue = PrepOptions().min_tissue
    rows = []
    for i, label in enumerate(labels):
        item = render(item_rng(seed, family, i), int(label), splits[i])
        slide_id = f"{family}_{i:04d}"
        store = write_store(
            item.image,
            out_dir / "stores",
            slide_id,
            patch_size=patch_size,
            background=255 if item.image.shape[0] == 3 and item.image.ndim == 3 else 0,
            mask=None,  # computed from the pixels, as `ips prep` does for a file
            min_tissue=min_tissue,
            spacing=spacing,
            truth_masks=dict(item.masks),
            truth_attrs={"label": item.label, "family": family, **dict(item.attrs)},
            extra_grids=extra_grids,
        )
        rows.append(
            {
                "slide_id": slide_id,
                "path": store.relative_to(out_dir).as_posix(),
                "label": item.label,
                "split": splits[i],
            }
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"family": family, "n_slides": n_slides, "seed": seed, "patch_size": patch_size, **params}
    record["extra_grids"] = [list(g) for g in extra_grids]
    (out_dir / "family.json").write_text(json.dumps(record, indent=1))
    return write_manifest(out_dir / "manifest.csv", rows, ["slide_id", "path", "label", "split"])


def place_boxes(
    rng: np.random.Generator, shape: Sequence[int], sizes: Sequence[int], gap: int
) -> list[tuple[int, ...]]:
    """Top-left corners of non-overlapping boxes of side `sizes[i]` inside `shape` (gap >= `gap` px
    between them); a box that finds no room in 500 tries raises ValueError."""
    placed: list[tuple[tuple[int, ...], int]] = []
    for s in sizes:
        for _ in range(500):
            corner = tuple(int(rng.integers(0, n - s + 1)) for n in shape)
            if all(
                any(c + s + gap <= o or o + so + gap <= c for c, o in zip(corner, oc)) for oc, so in placed
            ):
                placed.append((corner, s))
                break
        else:
            raise ValueError(f"no room for {len(sizes)} objects of {max(sizes)} px in {tuple(shape)}")
    return [c for c, _ in placed]
