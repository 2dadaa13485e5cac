#!/usr/bin/env python
"""Write a small-object dataset: H&E-like slides, one small target among similar distractors (stores + manifest).

    python tools/make_small_object_dataset.py --out data/smallobj --n-slides 400 --size 512 --patch-size 32

The rules are in `ips/synthetic/small_objects.py`; the task is binary `label` (1: the slide holds the
target), and each store holds the per-patch truth in `ips_truth/lesion` (target) and `ips_truth/distractor`.
"""

from __future__ import annotations

import argparse
import sys
import time

from ips.errors import PrepError
from ips.synthetic.small_objects import make_small_object_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", required=True, help="output folder: stores/, manifest.csv, small_objects.json"
    )
    parser.add_argument("--n-slides", type=int, default=400)
    parser.add_argument("--size", type=int, default=512, help="side in pixels")
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--positive-fraction", type=float, default=0.5)
    parser.add_argument("--distractors", type=int, nargs=2, default=(4, 8), metavar=("MIN", "MAX"))
    parser.add_argument(
        "--split-fractions", type=float, nargs=3, default=(0.6, 0.2, 0.2), metavar=("TRAIN", "VAL", "TEST")
    )
    parser.add_argument(
        "--max-object-fraction",
        type=float,
        default=0.02,
        help="refuse a target covering more of the slide than this (default 0.02)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        manifest = make_small_object_dataset(
            args.out,
            args.n_slides,
            args.size,
            args.patch_size,
            args.seed,
            positive_fraction=args.positive_fraction,
            split_fractions=args.split_fractions,
            n_distractors=tuple(args.distractors),
            max_object_fraction=args.max_object_fraction,
        )
    except (ValueError, OSError, PrepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.n_slides} slides and {manifest} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
