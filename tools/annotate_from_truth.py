#!/usr/bin/env python
"""Give a share of a synthetic dataset's training slides an annotation made from its planted truth.

    python tools/annotate_from_truth.py --manifest data/so/manifest.csv --fraction 0.1 --out data/so/annotated.csv

For the benchmark of patch-level guidance (docs/BENCHMARKS.md): a seeded `--fraction` of the train split
gets a mask (`<store>.annotation.npy`, one pixel per grid cell at the grid's level, 1 where the planted
object covers at least `--min-fraction` of the cell) in a new `annotation` column; negatives get an empty
mask, which says "nothing here". Other rows keep an empty cell. Stores need `ips_truth/<--truth>`:
`lesion` (lesion and small-object sets, the default) or `digit` (Megapixel MNIST: every digit is marked).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import zarr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True)
    p.add_argument("--fraction", type=float, required=True, help="share of the train split to annotate")
    p.add_argument("--out", required=True, help="the new manifest (same folder as --manifest keeps paths)")
    p.add_argument("--min-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truth", default="lesion", help="array under ips_truth/ that marks the objects")
    a = p.parse_args(argv)
    src = Path(a.manifest)
    rows = list(csv.DictReader(src.open()))
    train = [i for i, r in enumerate(rows) if r.get("split") in ("train", "", None)]
    rng = np.random.default_rng(a.seed)
    chosen = set(rng.choice(train, size=int(round(a.fraction * len(train))), replace=False).tolist())
    for i, row in enumerate(rows):
        row["annotation"] = ""
        if i not in chosen:
            continue
        store = src.parent / row["path"]
        g = zarr.open_group(str(store), mode="r")
        coords = np.asarray(g["grids/default/coords"][...])
        patch = int(g.attrs["ips"]["grids"]["default"]["patch_size"][0])
        truth = np.asarray(g[f"ips_truth/{a.truth}"][...]) >= a.min_fraction
        level0 = g["0"].shape[1:]
        mask = np.zeros([int(np.ceil(s / patch)) for s in level0], dtype=np.uint8)
        cells = coords[truth] // patch
        mask[cells[:, 0], cells[:, 1]] = 1
        out = store.with_suffix(".annotation.npy")
        np.save(out, mask)
        row["annotation"] = str(out.relative_to(src.parent)) if out.is_relative_to(src.parent) else str(out)
    with Path(a.out).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    n_marked = sum(1 for i in chosen if np.load(src.parent / rows[i]["annotation"]).any())
    print(
        f"annotated {len(chosen)} of {len(train)} training slides ({n_marked} with a marked patch) -> {a.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
