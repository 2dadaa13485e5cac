#!/usr/bin/env python
"""Write a Megapixel MNIST dataset (stores + manifest) for `ips train`.

    python tools/megapixel_mnist.py --mnist ../shared/data/mnist_5k.csv.gz --out data/mmnist \\
        --n-train 800 --n-val 200 --n-test 200 [--canvas 1500] [--patch-size 50] [--seed 0]

The rules are in `ips/synthetic/megapixel_mnist.py`; the tasks are `majority`, `max`, `top`, `multilabel`.
"""

from __future__ import annotations

import argparse
import sys
import time

from ips.errors import PrepError
from ips.synthetic._store import GridSpec
from ips.synthetic.megapixel_mnist import PAPER_CANVAS, make_megapixel_mnist


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mnist", required=True, help="MNIST CSV (784 pixels 0-255, then the label; .gz ok)")
    parser.add_argument(
        "--out", required=True, help="output folder: stores/, manifest.csv, megapixel_mnist.json"
    )
    parser.add_argument("--n-train", type=int, default=800)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument(
        "--canvas", type=int, default=PAPER_CANVAS, help="canvas side in pixels (paper: 1500)"
    )
    parser.add_argument("--patch-size", type=int, default=50, help="grid patch size and stride (paper: 50)")
    parser.add_argument("--digit-scale", type=int, default=1, help="integer upscaling of the 28-px digits")
    parser.add_argument(
        "--n-noise",
        type=int,
        default=None,
        help="noise patterns per canvas (default: 50 per 1500x1500, scaled by area)",
    )
    parser.add_argument(
        "--reference-others",
        action="store_true",
        help="draw the 2 non-majority digits as the reference does (may share a class)",
    )
    parser.add_argument(
        "--pool-fractions",
        type=float,
        nargs=3,
        default=(0.7, 0.15, 0.15),
        metavar=("TRAIN", "VAL", "TEST"),
        help="shares of each class's digits per split pool",
    )
    parser.add_argument(
        "--warp-train",
        type=float,
        default=0.0,
        metavar="S",
        help="draw each training canvas's digits through a random affine warp of strength S (1: up to "
        "+-15 degrees, +-15%% scale, +-0.25 shear); validation and test digits stay as they are",
    )
    parser.add_argument(
        "--extra-grid",
        action="append",
        default=[],
        metavar="NAME:LEVEL:PATCH:STRIDE",
        help="a further grid in every store, with its own digit truth (repeatable); e.g. halo:1:38:24 "
        "(half resolution, 38-px patches every 24 px: each digit lies whole in one patch); "
        "train on it with data.grid=NAME model.patch_size=PATCH",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        extra_grids = [GridSpec.parse(g) for g in args.extra_grid]
    except ValueError as e:
        parser.error(f"--extra-grid: {e}")
    t0 = time.perf_counter()
    try:
        manifest = make_megapixel_mnist(
            args.mnist,
            args.out,
            args.n_train,
            args.n_val,
            args.n_test,
            canvas=args.canvas,
            seed=args.seed,
            patch_size=args.patch_size,
            digit_scale=args.digit_scale,
            n_noise=args.n_noise,
            distinct_others=not args.reference_others,
            pool_fractions=args.pool_fractions,
            train_warp=args.warp_train,
            extra_grids=extra_grids,
        )
    except (ValueError, OSError, PrepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = args.n_train + args.n_val + args.n_test
    print(f"wrote {n} canvases and {manifest} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
