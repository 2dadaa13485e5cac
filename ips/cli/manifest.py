"""`ips manifest STORES... --labels LABELS.csv --out M.csv [--split 0.6,0.2,0.2] [--group-by patient] [--seed S]`

Writes `slide_id,path,<label columns>,split` for the stores `ips prep` made, with stratified, grouped,
seeded splits (`ips.data.cohort`). Exit 0: written; 2: a store without a label, a label without a store,
a store given twice, or another bad input (one line naming it).
"""

from __future__ import annotations

import argparse
from collections import Counter

from ips.data.manifest import SPLITS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "manifest",
        help="write the manifest CSV for prepped stores and a labels table, with train/val/test splits",
        description="Match each store DIR/<slide_id>.zarr to its row of the labels CSV (column slide_id) "
        "and write slide_id,path,<the labels' other columns>,split. Splits are stratified by --stratify, "
        "keep each --group-by value (e.g. a patient) in one split, keep split cells the labels file "
        "already has, and are the same for the same --seed.",
    )
    p.add_argument("stores", nargs="+", metavar="STORE", help="stores made by `ips prep`")
    p.add_argument("--labels", required=True, help="CSV with slide_id and label columns (any number)")
    p.add_argument("--out", required=True, help="the manifest CSV to write")
    p.add_argument(
        "--split",
        default="0.6,0.2,0.2",
        help="fractions of train,val,test (default 0.6,0.2,0.2; two values: no test split)",
    )
    p.add_argument("--group-by", help="a labels column (e.g. patient): its slides never span two splits")
    p.add_argument(
        "--stratify",
        default=None,
        help="comma-separated labels columns whose values are balanced over the splits (default: label "
        "when the labels file has it; 'none': not stratified)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ips.data.cohort import CohortPlan, build_manifest, parse_fractions, read_labels, write_manifest
    from ips.errors import ManifestError

    labels = Path(args.labels)
    if args.stratify is None:
        header = read_labels(labels)[0] if labels.is_file() else []
        stratify: tuple[str, ...] = ("label",) if "label" in header else ()
    elif args.stratify.strip().lower() == "none":
        stratify = ()
    else:
        stratify = tuple(c.strip() for c in args.stratify.split(",") if c.strip())
    out = Path(args.out)
    if out.is_dir():
        raise ManifestError(f"--out {out} is a directory; name the CSV file to write")
    plan = CohortPlan(parse_fractions(args.split), args.group_by, stratify, args.seed)
    rows = build_manifest(args.stores, labels, plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(rows, out)
    counts = Counter(r["split"] for r in rows)
    by = f", stratified by {','.join(stratify)}" if stratify else ""
    grouped = f", grouped by {args.group_by}" if args.group_by else ""
    print(
        f"ips manifest: {len(rows)} slides ({', '.join(f'{s} {counts.get(s, 0)}' for s in SPLITS)}"
        f"{by}{grouped}, seed {args.seed}) -> {out}"
    )
    return 0
