"""`ips synth KIND --out DIR ...`: write a synthetic dataset (stores + manifest + planted truth).

Kinds: `lesions` (H&E-like slides or grey volumes with planted lesions), `small-objects` (one small target
among similar distractors), `megapixel-mnist` (MNIST digits on a large canvas), and `annotate` (give a share
of a synthetic set's training slides an annotation mask made from its planted truth). The rules of each
dataset live in `ips.synthetic`; this module only parses options and reports.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from ips.errors import EXIT_OK, EXIT_USAGE, PrepError

SPLITS = ("TRAIN", "VAL", "TEST")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth",
        help="write a synthetic dataset (lesions, small-objects, megapixel-mnist) or annotations from its truth",
        description="Write a synthetic dataset: one store per slide under OUT/stores, OUT/manifest.csv, and "
        "the planted truth of every patch in each store (ips_truth/).",
    )
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    for add in (_add_lesions, _add_small_objects, _add_megapixel_mnist, _add_annotate, _add_big_slide):
        add(kinds)


def _common(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--seed", type=int, default=0, help="(default 0)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")


def _split_fractions(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--split-fractions",
        type=float,
        nargs=3,
        default=(0.6, 0.2, 0.2),
        metavar=SPLITS,
        help="shares of the slides in each split (default 0.6 0.2 0.2)",
    )


def _add_lesions(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "lesions",
        help="H&E-like slides (or grey volumes) with planted lesions; task `label` (1: a lesion)",
        description="Slides or volumes with 0 or more planted lesions (rules: ips.synthetic.lesions); the "
        "task is binary `label`, the truth per patch is ips_truth/lesion.",
    )
    _common(p, "output folder: stores/, manifest.csv, lesions.json")
    p.add_argument("--n-slides", type=int, default=40, help="(default 40)")
    p.add_argument(
        "--size", type=int, default=1024, help="side in pixels, voxels for --dims 3 (default 1024)"
    )
    p.add_argument("--patch-size", type=int, default=32, help="(default 32)")
    p.add_argument(
        "--dims", type=int, choices=(2, 3), default=2, help="2: RGB slides, 3: grey volumes (default 2)"
    )
    p.add_argument("--positive-fraction", type=float, default=0.5, help="(default 0.5)")
    _split_fractions(p)
    p.add_argument("--min-tissue", type=float, default=0.25, help="(default 0.25)")
    p.add_argument(
        "--detect-tissue",
        action="store_true",
        help="let the writer detect tissue instead of using the rendered tissue mask",
    )
    p.set_defaults(func=_run_lesions)


def _run_lesions(args: argparse.Namespace) -> int:
    from ips.synthetic.lesions import make_lesion_dataset

    what = f"{args.n_slides} {'volumes' if args.dims == 3 else 'slides'}"
    return _generate(
        args,
        what,
        lambda: make_lesion_dataset(
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
        ),
    )


def _add_small_objects(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "small-objects",
        help="H&E-like slides, one small target among similar distractors; task `label` (1: the target)",
        description="Slides that hold one small target or none, among similar distractors (rules: "
        "ips.synthetic.small_objects); truth per patch in ips_truth/lesion (target) and ips_truth/distractor.",
    )
    _common(p, "output folder: stores/, manifest.csv, small_objects.json")
    p.add_argument("--n-slides", type=int, default=400, help="(default 400)")
    p.add_argument("--size", type=int, default=512, help="side in pixels (default 512)")
    p.add_argument("--patch-size", type=int, default=32, help="(default 32)")
    p.add_argument("--positive-fraction", type=float, default=0.5, help="(default 0.5)")
    p.add_argument(
        "--distractors", type=int, nargs=2, default=(4, 8), metavar=("MIN", "MAX"), help="(default 4 8)"
    )
    _split_fractions(p)
    p.add_argument(
        "--max-object-fraction",
        type=float,
        default=0.02,
        help="refuse a target covering more of the slide than this (default 0.02)",
    )
    p.set_defaults(func=_run_small_objects)


def _run_small_objects(args: argparse.Namespace) -> int:
    from ips.synthetic.small_objects import make_small_object_dataset

    return _generate(
        args,
        f"{args.n_slides} slides",
        lambda: make_small_object_dataset(
            args.out,
            args.n_slides,
            args.size,
            args.patch_size,
            args.seed,
            positive_fraction=args.positive_fraction,
            split_fractions=args.split_fractions,
            n_distractors=tuple(args.distractors),
            max_object_fraction=args.max_object_fraction,
        ),
    )


def _add_megapixel_mnist(kinds: argparse._SubParsersAction) -> None:
    from ips.synthetic.megapixel_mnist import PAPER_CANVAS

    p = kinds.add_parser(
        "megapixel-mnist",
        help="MNIST digits on a large canvas; tasks majority, max, top, multilabel",
        description="Megapixel MNIST canvases (rules: ips.synthetic.megapixel_mnist); tasks `majority`, "
        "`max`, `top`, `multilabel`; truth per patch in ips_truth/digit.",
    )
    p.add_argument("--mnist", required=True, help="MNIST CSV (784 pixels 0-255, then the label; .gz ok)")
    _common(p, "output folder: stores/, manifest.csv, megapixel_mnist.json")
    p.add_argument("--n-train", type=int, default=800, help="(default 800)")
    p.add_argument("--n-val", type=int, default=200, help="(default 200)")
    p.add_argument("--n-test", type=int, default=200, help="(default 200)")
    p.add_argument(
        "--canvas",
        type=int,
        default=PAPER_CANVAS,
        help=f"canvas side in pixels (default {PAPER_CANVAS}, the paper's)",
    )
    p.add_argument(
        "--patch-size", type=int, default=50, help="grid patch size and stride (default 50, the paper's)"
    )
    p.add_argument(
        "--digit-scale", type=int, default=1, help="integer upscaling of the 28-px digits (default 1)"
    )
    p.add_argument(
        "--n-noise",
        type=int,
        default=None,
        help="noise patterns per canvas (default 50 per 1500x1500, scaled by area)",
    )
    p.add_argument(
        "--reference-others",
        action="store_true",
        help="draw the 2 non-majority digits as the reference does (may share a class)",
    )
    p.add_argument(
        "--pool-fractions",
        type=float,
        nargs=3,
        default=(0.7, 0.15, 0.15),
        metavar=SPLITS,
        help="shares of each class's digits per split pool (default 0.7 0.15 0.15)",
    )
    p.add_argument(
        "--warp-train",
        type=float,
        default=0.0,
        metavar="S",
        help="draw each training canvas's digits through a random affine warp of strength S (1: up to "
        "+-15 degrees, +-15%% scale, +-0.25 shear); validation and test digits stay as they are (default 0)",
    )
    p.add_argument(
        "--extra-grid",
        action="append",
        default=[],
        metavar="NAME:LEVEL:PATCH:STRIDE",
        help="a further grid in every store, with its own digit truth (repeatable); e.g. halo:1:38:24 "
        "(half resolution, 38-px patches every 24 px: each digit lies whole in one patch); "
        "train on it with data.grid=NAME model.patch_size=PATCH",
    )
    p.set_defaults(func=_run_megapixel_mnist)


def _run_megapixel_mnist(args: argparse.Namespace) -> int:
    from ips.synthetic._store import GridSpec
    from ips.synthetic.megapixel_mnist import make_megapixel_mnist

    try:
        extra_grids = [GridSpec.parse(g) for g in args.extra_grid]
    except ValueError as e:
        print(f"ips synth: --extra-grid: {e}", file=sys.stderr)
        return EXIT_USAGE
    return _generate(
        args,
        f"{args.n_train + args.n_val + args.n_test} canvases",
        lambda: make_megapixel_mnist(
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
        ),
    )


def _generate(args: argparse.Namespace, what: str, make: Callable[[], object]) -> int:
    """Run one generator; a bad option or an unwritable output is one line and exit status 2."""
    t0 = time.perf_counter()
    try:
        manifest = make()
    except (ValueError, OSError, PrepError) as e:
        print(f"ips synth {args.kind}: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not args.quiet:
        print(f"wrote {what} and {manifest} in {time.perf_counter() - t0:.1f} s")
    return EXIT_OK


def _add_annotate(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "annotate",
        help="annotation masks from a synthetic set's planted truth, for a share of its training slides",
        description="Give a seeded share of a synthetic manifest's train split an annotation mask made from "
        "the planted truth (<store>.annotation.npy, one pixel per grid cell at the grid's level, 1 where the "
        "object covers at least --min-fraction of the cell), in a new `annotation` column of a new manifest. "
        'Negative slides get an empty mask ("nothing here"); other rows keep an empty cell.',
    )
    p.add_argument("--manifest", required=True, help="a manifest written by `ips synth`")
    p.add_argument("--fraction", type=float, required=True, help="share of the train split to annotate")
    p.add_argument("--out", required=True, help="the new manifest (in --manifest's folder to keep its paths)")
    p.add_argument(
        "--min-fraction",
        type=float,
        default=0.25,
        help="share of a cell the object must cover (default 0.25)",
    )
    p.add_argument(
        "--truth",
        default="lesion",
        help="array under ips_truth/ that marks the objects: lesion (lesion and small-object sets), "
        "digit (Megapixel MNIST) (default lesion)",
    )
    p.add_argument("--seed", type=int, default=0, help="(default 0)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=_run_annotate)


def _run_annotate(args: argparse.Namespace) -> int:
    from ips.synthetic.annotate import annotate_from_truth

    if not 0.0 <= args.fraction <= 1.0:
        print(f"ips synth annotate: --fraction {args.fraction} is not in [0, 1]", file=sys.stderr)
        return EXIT_USAGE
    done = annotate_from_truth(
        args.manifest,
        args.out,
        fraction=args.fraction,
        min_fraction=args.min_fraction,
        truth=args.truth,
        seed=args.seed,
    )
    if not args.quiet:
        print(
            f"annotated {done.n_annotated} of {done.n_train} training slides "
            f"({done.n_marked} with a marked patch) -> {args.out}"
        )
    return EXIT_OK


def _add_big_slide(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "big-slide",
        help="one real-size, 40x-like pyramidal TIFF (H&E-like tissue regions on glass), written tile by tile",
        description="Write one SIZE x SIZE px pyramidal tiled TIFF at --mpp um/px (rules: "
        "ips.synthetic.big_slide), streaming: memory holds a few tiles, not the image. Reduced levels are "
        "SubIFDs, each the 2x2 mean of the level above; a scratch file beside --out is removed at the end.",
    )
    p.add_argument("--out", required=True, help="the TIFF to write")
    p.add_argument("--size", type=int, default=60_000, help="side in pixels (default 60000)")
    p.add_argument("--seed", type=int, default=0, help="(default 0)")
    p.add_argument("--tile", type=int, default=512, help="tile side in pixels (default 512)")
    p.add_argument(
        "--mpp", type=float, default=0.25, help="um per pixel of level 0 (default 0.25, a 40x scan)"
    )
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=_run_big_slide)


def _run_big_slide(args: argparse.Namespace) -> int:
    from ips.synthetic.big_slide import BigSlideSpec, write_big_slide

    def make() -> object:
        spec = BigSlideSpec(
            size=args.size, seed=args.seed, tile=args.tile, mpp=args.mpp, quality=args.quality
        )
        return write_big_slide(args.out, spec)

    return _generate(args, f"a {args.size} x {args.size} px slide", make)
