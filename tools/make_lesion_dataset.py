#!/usr/bin/env python
"""Write a synthetic lesion dataset (H&E-like slides or grey volumes, stores + manifest + truth).

    python tools/make_lesion_dataset.py --out data/lesions --n-slides 40 --size 1024 --patch-size 32
    python tools/make_lesion_dataset.py --out data/lesions3d --dims 3 --n-slides 20 --size 64 --patch-size 16

The rules are in `ips/synthetic/lesions.py`; the task is binary `label` (1: at least one lesion), and each
store holds the per-patch truth in `ips_truth/lesion`.
"""

from __future__ import annotations

import argparse
import sys
import time

from ips.errors import PrepError
from ips.synthetic.lesions import make_lesion_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder: stores/, manifest.csv, lesions.json")
    parser.add_argument("--n-slides", type=int, default=40)
    parser.add_argument("--size", type=int, default=1024, help="side in pixels (voxels for --dims 3)")
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2, help="2: RGB slides, 3: grey volumes")
    parser.add_argument("--positive-fraction", type=float, default=0.5)
    parser.add_argument(
        "--split-fractions", type=float, nargs=3, default=(0.6, 0.2, 0.2), metavar=("TRAIN", "VAL", "TEST")
    )
    parser.add_argument("--min-tissue", type=float, default=0.25)
    parser.add_argument(
        "--detect-tissue",
        action="store_true",
        help="let the writer detect tissue instead of using the rendered tissue mask",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        manifest = make_lesion_dataset(
            args.out,
            args.n_slides,
            args.size,
            args.patch_size,
            args.seed,
            positive_fraction=args.positive_fraction,
            spatial_dims=args.dims,
            split_fractions=args.split_fractions,
            detect_tissue=args.detect_tissue,
            min_tissue=args.min_tissue,
        )
    except (ValueError, OSError, PrepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.n_slides} {'volumes' if args.dims == 3 else 'slides'} and {manifest} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
