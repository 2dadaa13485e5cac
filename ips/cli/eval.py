"""`ips eval heatmaps DIR --manifest M`: heatmap AUROC against a synthetic set's planted truth.

For one split of a manifest written by `ips synth`: per task, the mean per-slide AUROC of the attention of
every patch (`DIR/<slide_id>/scores.zarr`, written by `ips heatmap`) against the store's truth
(`ips_truth/<truth>`). "any" counts every patch the truth touches as positive; "core" only those it covers
by at least `ips.eval.CORE_SHARE`, leaving out the slivers at an object's edge. Slides without a positive
or a negative patch are skipped. With `--checkpoint`, `ips heatmap` runs first and writes DIR.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from ips.cli._threads import add_threads
from ips.errors import EXIT_OK, EXIT_USAGE, ManifestError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate heatmaps against a synthetic set's planted truth (AUROC per task)",
        description="Evaluate results against the planted truth of a synthetic dataset (`ips synth`).",
    )
    kinds = p.add_subparsers(dest="kind", metavar="WHAT", required=True)
    h = kinds.add_parser(
        "heatmaps",
        help="mean per-slide AUROC of each patch's attention against the planted truth",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    h.add_argument("heatmaps", metavar="DIR", help="heatmap folder: DIR/<slide_id>/scores.zarr")
    h.add_argument("--manifest", required=True, help="the dataset's manifest.csv (written by `ips synth`)")
    h.add_argument("--split", default="test", help="rows of this split (default test)")
    h.add_argument(
        "--limit", type=int, default=0, help="only the first N slides of the split (default 0: all)"
    )
    h.add_argument(
        "--truth",
        default="lesion",
        help="array under ips_truth/: lesion (lesion and small-object sets), digit (Megapixel MNIST) "
        "(default lesion)",
    )
    h.add_argument(
        "--checkpoint",
        default=None,
        help="run `ips heatmap` with this checkpoint into DIR first (default: no)",
    )
    h.add_argument("--device", default="auto", help="with --checkpoint: auto, cpu, cuda, ... (default auto)")
    add_threads(h)  # with --checkpoint: passed to `ips heatmap`
    h.add_argument("--json", default=None, help="write the summary here (default DIR/summary.json)")
    h.add_argument("--quiet", action="store_true", help="print nothing but errors")
    h.set_defaults(func=run_heatmaps)


def split_rows(manifest: Path, split: str, limit: int) -> list[dict[str, str]]:
    """The manifest's rows of `split` (the first `limit` when > 0); ManifestError when there are none."""
    if not manifest.is_file():
        raise ManifestError(f"{manifest}: no such manifest")
    with manifest.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("split") == split]
    if not rows:
        raise ManifestError(f"{manifest}: no row of split {split!r}")
    return rows[:limit] if limit > 0 else rows


def run_subcommand(name: str, argv: list[str]) -> int:
    """Run `ips NAME ARGV` in this process through the subcommand's own parser (`register` + `func`)."""
    import importlib

    parser = argparse.ArgumentParser(prog="ips")
    importlib.import_module(f"ips.cli.{name}").register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return int(args.func(args))


def run_heatmaps(args: argparse.Namespace) -> int:
    import zarr

    from ips.data.manifest import resolve_path
    from ips.eval import heatmap_truth_summary

    manifest, out = Path(args.manifest), Path(args.heatmaps)
    rows = split_rows(manifest, args.split, args.limit)
    stores = [resolve_path(r["path"], manifest.parent)[0] for r in rows]
    if args.checkpoint is not None:
        cmd = [
            "heatmap",
            "--checkpoint",
            args.checkpoint,
            *map(str, stores),
            "--out",
            str(out),
            "--top-k",
            "0",
        ]
        cmd += ["--device", args.device, *([] if args.threads is None else ["--threads", str(args.threads)])]
        if run_subcommand("heatmap", cmd) != EXIT_OK:
            print("ips eval heatmaps: `ips heatmap` failed (see above)", file=sys.stderr)
            return EXIT_USAGE
    pairs = [(out / r["slide_id"] / "scores.zarr", Path(s)) for r, s in zip(rows, stores, strict=True)]
    missing = [str(sc) for sc, _ in pairs if not sc.is_dir()]
    if missing:
        print(
            f"ips eval heatmaps: no heatmap scores at {missing[0]} (run `ips heatmap` or pass --checkpoint)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    tasks = list(zarr.open_group(str(pairs[0][0]), mode="r").attrs["tasks"])
    summary = heatmap_truth_summary(pairs, tasks, truth=args.truth)
    path = Path(args.json) if args.json else out / "summary.json"
    path.write_text(json.dumps(summary, indent=1))
    if not args.quiet:
        print(json.dumps(summary))
    return EXIT_OK
