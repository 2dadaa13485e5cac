"""`ips pretrain STORE... --config CFG.yaml --out DIR [--overwrite] [key=value ...]`: self-supervised
encoder pretraining."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ips.cli._common import add_device, add_overwrite, add_quiet, split_overrides
from ips.cli._threads import add_threads, apply_threads
from ips.errors import ConfigError, IpsError, ManifestError, one_line

# what a pretraining writes into --out: removed by --overwrite (nothing else in the folder is touched)
PRETRAIN_FILES = ("encoder.pt", "encoder.json", "state.pt", "loss.csv", "loss.png")


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
        help="ips stores (made by ips prep) or manifest CSVs (their stores); section.key=value items are "
        "config overrides, e.g. pretrain.epochs=4",
    )
    p.add_argument("--config", required=True, help="experiment YAML: model and pretrain sections are used")
    p.add_argument("--out", required=True, help="output folder: encoder.pt, encoder.json, state.pt, loss.png")
    add_device(p)
    add_overwrite(
        p,
        "remove a pretraining already in --out and start over instead of resuming it",
        old_name="--no-resume",
    )
    add_quiet(p, "no progress bar")
    p.add_argument(
        "--split",
        choices=("train", "val", "test"),
        help="of a manifest CSV, take only the rows of this split (e.g. train: no validation or test "
        "slide is seen, not even without its label); stores given directly are always taken",
    )
    # the overrides' old spelling, kept so that existing scripts run: `--set k=v` is `k=v`
    p.add_argument(
        "--set", nargs="+", action="extend", default=[], metavar="key=value", help=argparse.SUPPRESS
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
            try:
                with open(item, newline="", encoding="utf-8-sig") as f:
                    reader = csv.DictReader(f)
                    if split is not None and "split" not in (reader.fieldnames or []):
                        raise ManifestError(
                            f"{item}: --split {split} given, but the manifest has no split column"
                        )
                    rows = [
                        row for row in reader if split is None or (row.get("split") or "").strip() == split
                    ]
            except UnicodeDecodeError as e:
                raise ManifestError(
                    f"{item}: not UTF-8 text (byte {e.start}); save the manifest as UTF-8 CSV"
                ) from None
            if any(not (row.get("path") or "").strip() for row in rows):
                raise ManifestError(f"{item}: a row without a path (the manifest needs a 'path' column)")
            if not rows:
                raise ManifestError(f"{item}: no row" + (f" of split {split!r}" if split else "s"))
            out += [resolve_path(row["path"].strip(), Path(item).parent)[0] for row in rows]
        else:
            out.append(item)
    return out


def run(args: argparse.Namespace) -> int:
    from ips.config import load_config
    from ips.pretrain import pretrain_encoder
    from ips.training.rundir import RunLock, remove_run

    apply_threads(args.threads)
    inputs, overrides = split_overrides(args.stores)
    cfg = load_config(args.config, [*overrides, *args.set])
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    stores = _expand(inputs, args.split)
    if not stores:
        raise ConfigError("no stores to pretrain on: give STORE paths or a manifest CSV")
    # the run lock of `ips train`: two pretrainings into one --out would overwrite each other's state
    with RunLock(out):
        if args.overwrite:
            removed = remove_run(out, PRETRAIN_FILES)
            if removed:
                print(f"--overwrite: removed the previous pretraining's {', '.join(removed)} from {out}")
        try:
            result = pretrain_encoder(
                cfg, stores, out, device=args.device, resume=not args.overwrite, show_progress=not args.quiet
            )
        except ValueError as e:  # what the stores cannot give (no patches, wrong channels): one line
            if isinstance(e, IpsError):
                raise
            print(f"ips pretrain: {one_line(e)}", file=sys.stderr)
            return 2
    print(
        f"pretrained encoder: {result['encoder']} ({result['method']}, loss {result['losses'][0]:.3f} -> "
        f"{result['losses'][-1]:.3f}, {result['seconds']:.0f} s); train with model.pretrained={result['encoder']}"
    )
    return 0
