"""A texture, not a shape: a tumour-like region among inflamed regions (family d of the learnability matrix).

H&E-like tissue everywhere (`ips.synthetic.marks.tissue_od`). Each slide holds 3-5 *inflamed* regions:
irregular patches of tissue crowded with small, round, very dark nuclei (lymphocytes). A positive slide
also holds one *tumour* region of the same size and outline statistics: large, pleomorphic, paler nuclei
with less stroma between them. Both are "dense dark nuclei" at a glance; only the nuclei's size and shape
tell them apart. Regions are 2-3 patch sizes across and irregular (a thresholded smooth field inside a
disc), so their edges cut through patches.

Truth: `ips_truth/lesion` = share of each patch inside the tumour region, `ips_truth/distractor` inside an
inflamed one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ips.synthetic._family import FamilyItem, place_boxes, write_family_dataset
from ips.synthetic.lesions import EOSIN, HEMATOXYLIN, _smooth_field, _sprinkle
from ips.synthetic.marks import od_to_rgb, tissue_od

REGION_SIZE = (2.0, 3.0)  # across, in patch sizes


def irregular_region(rng: np.random.Generator, side: int) -> np.ndarray:
    """A bool `(side, side)` blob: a disc whose outline a smooth random field bends in and out."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, side), np.linspace(-1, 1, side), indexing="ij")
    field = 1.0 - (yy**2 + xx**2) + 0.25 * _smooth_field(rng, (side, side), 3)
    return field > 0.35


def render_texture_slide(
    rng: np.random.Generator,
    *,
    size: int,
    patch_size: int,
    positive: bool,
    n_inflamed: tuple[int, int] = (3, 5),
) -> FamilyItem:
    """One `(3, size, size)` slide: 3-5 inflamed regions, plus one tumour region when `positive`."""
    n_inf = int(rng.integers(n_inflamed[0], n_inflamed[1] + 1))
    kinds = ["tumour"] * int(positive) + ["inflamed"] * n_inf
    sides = (rng.uniform(*REGION_SIZE, len(kinds)) * patch_size).round().astype(int)
    corners = place_boxes(rng, (size, size), sides.tolist(), gap=patch_size // 2)
    od = tissue_od(rng, size, size)
    masks = {"lesion": np.zeros((size, size), bool), "distractor": np.zeros((size, size), bool)}
    nuclei = np.zeros((size, size), np.float32)
    for kind, (r, c), s in zip(kinds, corners, sides):
        region = np.zeros((size, size), bool)
        region[r : r + s, c : c + s] = irregular_region(rng, int(s))
        if kind == "tumour":
            masks["lesion"] |= region
            _sprinkle(rng, nuclei, region, 0.016, (3.5, 6.0), (0.8, 1.3), (0.55, 1.0))
        else:
            masks["distractor"] |= region
            _sprinkle(rng, nuclei, region, 0.03, (1.6, 2.4), (1.2, 1.6), (0.85, 1.0))
    # less stroma where cells crowd; the nuclei's stain on top
    crowded = masks["lesion"] | masks["distractor"]
    od -= (0.35 * crowded)[..., None] * EOSIN * 0.38
    od += (rng.uniform(0.85, 1.15) * nuclei)[..., None] * HEMATOXYLIN
    return FamilyItem(od_to_rgb(od), label=int(positive), masks=masks, attrs={"regions": kinds})


def make_texture_regions(
    out_dir: str | Path, n_slides: int, *, seed: int = 0, size: int = 512, patch_size: int = 32
) -> Path:
    """Family d: a tumour-like texture region among inflamed regions. Returns the manifest path."""

    def render(rng: np.random.Generator, label: int, split: str) -> FamilyItem:
        return render_texture_slide(rng, size=size, patch_size=patch_size, positive=bool(label))

    return write_family_dataset(
        out_dir,
        family="texture",
        n_slides=n_slides,
        seed=seed,
        render=render,
        patch_size=patch_size,
        spacing=(0.5, 0.5),
        params={"size": size},
    )
