"""`ips suggest --checkpoint C [--checkpoint C2 ...] --manifest M --budget K --out DIR [--split S] [--regions R] [--by ...]`

Ranks the manifest's slides without an `annotation` by how much annotating them is expected to help and
writes `DIR/suggestions.csv` (`slide_id,score,rank`, then the components) and `DIR/regions/<slide_id>.geojson`
(the regions to look at first, QuPath GeoJSON in level-0 pixels); see `ips.infer.worklist`. Several
checkpoints (or a run folder of `ips train --seeds`) add the disagreement between runs. Exit 0: done;
1: some slides failed (the others are still ranked); 2: bad usage.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ips.cli._common import add_device, add_quiet
from ips.cli._threads import add_threads, apply_threads
from ips.data.manifest import SPLITS
from ips.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    from ips.infer.suggest import COMPONENTS

    p = subparsers.add_parser(
        "suggest",
        help="where to annotate next: rank unannotated slides and outline regions in them",
        description="Score every slide of the manifest without an annotation by prediction uncertainty, "
        "disagreement between runs, attention entropy and novelty against the annotated slides; write the "
        "best --budget as DIR/suggestions.csv with GeoJSON outlines of the regions to look at.",
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="a checkpoint of `ips train` (repeat for several runs), or a run folder: every "
        "checkpoints/best.pt in it or one level below (the seeds of `ips train --seeds`)",
    )
    p.add_argument("--manifest", required=True, help="CSV slide_id,path[,...][,split][,annotation]")
    p.add_argument("--budget", type=int, required=True, help="how many slides to suggest")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--split", choices=SPLITS, help="only the manifest rows of this split (e.g. train)")
    p.add_argument("--regions", type=int, default=5, help="patches outlined per suggested slide (default 5)")
    p.add_argument(
        "--by",
        default=",".join(COMPONENTS),
        help=f"comma-separated score components, summed (default {','.join(COMPONENTS)})",
    )
    add_device(p)
    add_quiet(p, "no per-slide lines")
    add_threads(p)
    p.set_defaults(func=run)


def checkpoint_files(items: list[str]) -> list[Path]:
    """Each item as checkpoint files: a file as given; a folder's `checkpoints/best.pt` or, failing that,
    its subfolders' (sorted). ConfigError naming an item that is neither, or a checkpoint given twice."""
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            own = path / "checkpoints" / "best.pt"
            inner = [own] if own.is_file() else sorted(path.glob("*/checkpoints/best.pt"))
            if not inner:
                raise ConfigError(
                    f"--checkpoint {item}: a folder with no checkpoints/best.pt in it or below it"
                )
            found += inner
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError(f"--checkpoint {item}: no such file or folder")
    seen = [p.resolve() for p in found]
    twice = next((p for i, p in enumerate(found) if seen[i] in seen[:i]), None)
    if twice is not None:
        raise ConfigError(f"--checkpoint {twice} is given twice")
    return found


def run(args: argparse.Namespace) -> int:
    import time

    from ips.cli._inference_args import err, out_dir, report_failures
    from ips.data.manifest import read_manifest
    from ips.infer.loop import load
    from ips.infer.worklist import SuggestPlan, check_same_tasks, suggest_slides

    plan = SuggestPlan(args.budget, args.regions, tuple(c.strip() for c in args.by.split(",") if c.strip()))
    files = checkpoint_files(args.checkpoint)
    out = out_dir(args.out)
    apply_threads(args.threads)
    runs = [load(f, args.device) for f in files]
    check_same_tasks(runs, [str(f) for f in files])
    records = read_manifest(args.manifest, runs[0].cfg.model.tasks, args.split, require_labels=False)
    if not any(not r.annotation for r in records):
        raise ConfigError(
            f"no unannotated slides in {args.manifest}" + (f" of split {args.split}" if args.split else "")
        )
    t0 = time.perf_counter()
    report = suggest_slides(runs, records, out, plan, log=None if args.quiet else err)
    print(
        f"ips suggest: {len(report.ranked)} of {report.n_candidates} unannotated slides suggested "
        f"({len(files)} run(s), {report.n_annotated} annotated slides for novelty, by {','.join(plan.use)}) "
        f"in {time.perf_counter() - t0:.1f}s -> {report.csv}"
    )
    return report_failures("suggest", report.failures, len(records))
