"""`ips pretrain STORE... --config CFG.yaml --out DIR [key=value ...]`: self-supervised encoder pretraining."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ips.cli._threads import add_threads, apply_threads


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="self-supervised pretraining of the encoder on the stores' patches (no labels)",
        description="Pretrain the config's encoder (SimCLR in 2D, rotation prediction in 3D; the pretrain: "
        "section) on patches drawn from the stores' grids. Writes DIR/encoder.pt for "
        "`ips train ... model.pretrained=DIR/encoder.pt`; rerunning resumes.",
    )
    p.add_argument(
        "stores",
        nargs="+",
        metavar="STORE|key=value",
        help="ips stores (made by ips prep) or manifest CSVs (their stores); key=value items are "
        "config overrides, e.g. pretrain.epochs=4",
    )
    p.add_argument("--config", required=True, help="experiment YAML: model and pretrain sections are used")
    p.add_argument("--out", required=True, help="output folder: encoder.pt, encoder.json, state.pt, loss.png")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    p.add_argument(
        "--no-resume", action="store_true", help="start over even if DIR holds a pretraining state"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--split",
        choices=("train", "val", "test"),
        help="of a manifest CSV, take only the rows of this split (e.g. train: no validation or test "
        "slide is seen, not even without its label); stores given directly are always taken",
    )
    p.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="key=value",
        help="config overrides after the options, e.g. --set pretrain.epochs=4",
    )
    add_threads(p)
    p.set_defaults(func=run, trailing_overrides="stores")


def _expand(items: list[str], split: str | None = None) -> list[str]:
    """Stores as given; a `.csv` argument stands for the stores of that manifest (its `path` column),
    only those of `split` when it is given."""
    import csv

    from ips.data.manifest import resolve_path

    out: list[str] = []
    for item in items:
        if item.endswith(".csv") and Path(item).is_file():
            with open(item, newline="") as f:
                reader = csv.DictReader(f)
                if split is not None and "split" not in (reader.fieldnames or []):
                    raise ValueError(f"{item}: --split {split} given, but the manifest has no split column")
                rows = [row for row in reader if split is None or row["split"].strip() == split]
            if not rows:
                raise ValueError(f"{item}: no row" + (f" of split {split!r}" if split else "s"))
            out += [resolve_path(row["path"], Path(item).parent)[0] for row in rows]
        else:
            out.append(item)
    return out


def run(args: argparse.Namespace) -> int:
    from ips.config import load_config
    from ips.data.store import StoreError
    from ips.pretrain import pretrain_encoder

    apply_threads(args.threads)
    # argparse cannot split one positional list in two: items with '=' are overrides, the rest stores
    overrides = [o for o in args.stores if "=" in o] + list(args.set)
    cfg = load_config(args.config, overrides)
    try:
        stores = _expand([s for s in args.stores if "=" not in s], args.split)
        result = pretrain_encoder(
            cfg, stores, args.out, device=args.device, resume=not args.no_resume, show_progress=not args.quiet
        )
    except (StoreError, ValueError) as e:
        if type(e).__name__ == "ConfigError":
            raise
        print(f"ips pretrain: {e}", file=sys.stderr)
        return 2
    print(
        f"pretrained encoder: {result['encoder']} ({result['method']}, loss {result['losses'][0]:.3f} -> "
        f"{result['losses'][-1]:.3f}, {result['seconds']:.0f} s); train with model.pretrained={result['encoder']}"
    )
    return 0
