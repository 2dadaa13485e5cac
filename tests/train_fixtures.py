"""A tiny learnable slide collection for training tests: stores written by the real writer.

Each slide is a 1-channel 64 x 64 image of grey noise in a grid of 8 x 8 patches (64 patches); a
positive slide has one patch, at a random place, carrying a bright cross. The label is 1 iff the cross
is present: learnable only by attending to the right patch.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from data_prep.convert import PrepOptions, convert_array

PATCH = 8
SIZE = 64


def make_cross_slides(out: Path, n_train: int, n_val: int, seed: int = 0, size: int = SIZE) -> Path:
    """Write `out/<id>.zarr` stores and `out/manifest.csv` (slide_id,path,label,split); return the manifest."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    options = PrepOptions(patch_size=PATCH, min_tissue=0.0, thumbnail=False, hash_source=False)
    for i in range(n_train + n_val):
        label = i % 2
        img = rng.integers(40, 120, size=(1, size, size), dtype=np.uint8)
        if label:
            r, c = rng.integers(0, size // PATCH, size=2) * PATCH
            img[0, r + 3 : r + 5, c + 1 : c + 7] = 250
            img[0, r + 1 : r + 7, c + 3 : c + 5] = 250
        slide_id = f"s{i:03d}"
        convert_array(img, out, slide_id, options=options, mask=np.ones((size, size), dtype=bool))
        rows.append({"slide_id": slide_id, "path": f"{slide_id}.zarr", "label": label,
                     "split": "train" if i < n_train else "val"})
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide_id", "path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest
