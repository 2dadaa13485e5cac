#!/usr/bin/env python
"""Accuracy of a model trained on stores of each codec: same slides, same seed, one table.

    python benchmarks/codec_accuracy.py --out /tmp/codec_acc --n-slides 48 --size 512 --seeds 0 1

1. render: `--n-slides` synthetic H&E-like slides (`ips.synthetic.lesions`, as `ips demo`: half with 1-3
   planted lesions; same labels and train/val/test splits as `make_lesion_dataset`), each written as an
   uncompressed RGB TIFF at 0.5 um/px (tifffile): the source every codec starts from;
2. prep, once per codec: `ips prep tiffs/*.tif --out <codec>/stores --patch-size 32 --min-tissue 0.25
   --codec C [--codec-level Q] --threads 1 --no-thumbnail` (tissue detected by prep on the coded pixels,
   so a codec may change a grid slightly: `patches` in the table);
3. per store set: `manifest.csv` (slide_id, path, label, split, n_lesions) and `truth.npz` (per slide
   `(N,)` float32: the share of each grid patch inside a planted lesion, from the rendered lesion mask
   at that store's own grid coordinates);
4. train `configs/demo.yaml` (the `ips demo` config; `train.seed` = each of `--seeds`) on each set, one
   run at a time in this process, one torch thread; a finished run is reused;
5. on the test split (top-M prediction, as trained): accuracy and AUROC of the slide logits, and the
   heatmap AUROC (attention of every patch against "overlaps a lesion", mean over positive test slides);
   store bytes (all stores, and level 0 alone, against the TIFFs) and PSNR of level 0 against the TIFFs.

Writes `<out>/codec_accuracy.json` and prints a markdown table.

Results page row: docs/BENCHMARKS.md, "Accuracy per codec".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
import zarr

from data_prep.options import CODECS
from ips.cli.main import main as ips_main
from ips.config import load_config
from ips.data.manifest import read_manifest
from ips.data.open import make_source
from ips.format import names
from ips.infer.engine import infer_slide
from ips.model.checkpoint import load_model
from ips.model.metrics import auroc
from ips.synthetic._store import grid_share, stratified_splits, write_manifest
from ips.synthetic.lesions import render_slide_2d, slide_labels, slide_rng
from ips.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
MPP = 0.5  # um/px of the rendered slides (a 20x scan), written into the TIFFs' resolution tags
SPLITS = (0.6, 0.2, 0.2)  # train / val / test, as make_lesion_dataset
MANIFEST_COLUMNS = ["slide_id", "path", "label", "split", "n_lesions"]


def parse_codec(text: str) -> tuple[str, int | None]:
    """`jpeg:90` -> `("jpeg", 90)`; `blosc-lz4` -> `("blosc-lz4", None)` (the codec's default level)."""
    name, _, level = text.partition(":")
    if name not in CODECS:
        raise argparse.ArgumentTypeError(f"unknown codec {name!r}; choose from {', '.join(CODECS)}")
    try:
        return name, int(level) if level else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"codec level must be a whole number: {text!r}") from None


def codec_label(name: str, level: int | None) -> str:
    return name if level is None else f"{name}:{level}"


def render(out: Path, n_slides: int, size: int, patch: int, seed: int) -> list[dict[str, Any]]:
    """Write `out/tiffs/<slide_id>.tif` `(H, W, 3)` uint8 and `out/lesion_masks.npz` (per slide the lesion
    pixel mask `(H, W)`); returns the manifest rows without paths.
    Reuses what a previous run wrote (rendering is deterministic in `seed`)."""
    tiffs, cells_file = out / "tiffs", out / "lesion_masks.npz"
    labels = slide_labels(n_slides, 0.5, seed)
    splits = stratified_splits(labels.tolist(), SPLITS, seed)
    rows, cells = [], {}
    tiffs.mkdir(parents=True, exist_ok=True)
    for i, label in enumerate(labels):
        slide_id = f"lesion2d_{i:04d}"
        slide = render_slide_2d(slide_rng(seed, i), size, patch, positive=bool(label))
        path = tiffs / f"{slide_id}.tif"
        if not path.is_file():
            tmp = path.with_name(f".{path.name}.tmp")  # a killed run never leaves a half TIFF
            tifffile.imwrite(
                tmp,
                slide.image.transpose(1, 2, 0),  # (3, H, W) -> (H, W, 3)
                photometric="rgb",
                resolution=(1e4 / MPP, 1e4 / MPP),
                resolutionunit="CENTIMETER",
            )
            tmp.replace(path)
        cells[slide_id] = slide.lesion_mask
        rows.append(
            {"slide_id": slide_id, "label": slide.label, "split": splits[i], "n_lesions": len(slide.lesions)}
        )
    np.savez_compressed(cells_file, **cells)
    return rows


def prep_command(tiffs: Path, stores: Path, name: str, level: int | None, patch: int) -> list[str]:
    """The `ips prep` arguments that make one store set (after `ips`)."""
    argv = ["prep", *sorted(str(p) for p in tiffs.glob("*.tif")), "--out", str(stores)]
    argv += ["--patch-size", str(patch), "--min-tissue", "0.25", "--codec", name]
    argv += [] if level is None else ["--codec-level", str(level)]
    return [*argv, "--threads", "1", "--no-thumbnail"]


def make_set(out: Path, rows: list[dict[str, Any]], name: str, level: int | None, patch: int) -> Path:
    """Prep the TIFFs with one codec into `out/<codec>/stores`; write its manifest and truth.npz. Returns
    the manifest. Complete stores of a previous run are kept (prep skips them)."""
    set_dir = out / codec_label(name, level).replace(":", "_q")
    argv = prep_command(out / "tiffs", set_dir / "stores", name, level, patch)
    if ips_main(argv) != 0:
        raise RuntimeError(f"ips prep failed for codec {codec_label(name, level)}: see the messages above")
    with np.load(out / "lesion_masks.npz") as npz:
        cells = dict(npz)
    truth, manifest_rows = {}, []
    for row in rows:
        store = set_dir / "stores" / f"{row['slide_id']}.zarr"
        coords = np.asarray(
            zarr.open_array(
                str(store / names.GRIDS_GROUP / names.DEFAULT_GRID / names.COORDS_ARRAY), mode="r"
            )[...]
        )
        truth[row["slide_id"]] = grid_share(cells[row["slide_id"]], coords, (patch, patch), (1, 1))  # (N,)
        manifest_rows.append({**row, "path": store.relative_to(set_dir).as_posix()})
    np.savez_compressed(set_dir / "truth.npz", **truth)
    return write_manifest(set_dir / "manifest.csv", manifest_rows, MANIFEST_COLUMNS)


def store_stats(set_dir: Path, tiffs: Path) -> dict[str, Any]:
    """Bytes of the stores (all files; level 0 alone), of the TIFFs, patches, and PSNR of level 0 against
    the TIFFs over all slides' pixels (None: exact)."""
    total = level0 = source = patches = 0
    sq_err, n_values = 0.0, 0
    for tif in sorted(tiffs.glob("*.tif")):
        store = set_dir / "stores" / f"{tif.stem}.zarr"
        total += sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        level0 += sum(f.stat().st_size for f in (store / "0").rglob("*") if f.is_file())
        source += tif.stat().st_size
        patches += int(
            zarr.open_array(
                str(store / names.GRIDS_GROUP / names.DEFAULT_GRID / names.COORDS_ARRAY), mode="r"
            ).shape[0]
        )
        ref = tifffile.imread(tif).transpose(2, 0, 1).astype(np.float64)  # (3, H, W)
        got = np.asarray(zarr.open_array(str(store / "0"), mode="r")[...], dtype=np.float64)
        sq_err += float(((got - ref) ** 2).sum())
        n_values += ref.size
    mse = sq_err / n_values
    psnr = None if mse == 0 else round(10 * np.log10(255.0**2 / mse), 2)
    return {
        "store_bytes": total,
        "level0_bytes": level0,
        "tiff_bytes": source,
        "patches": patches,
        "psnr_db": psnr,
    }


def train_set(set_dir: Path, manifest: Path, seed: int, overrides: list[str]) -> Path:
    """Train `configs/demo.yaml` with `train.seed=seed` into `set_dir/run_s<seed>`; the best checkpoint.
    A finished run is reused (resume with no epochs left); an interrupted one resumes."""
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"train.seed={seed}", "train.device=cpu", *overrides])
    run_dir = set_dir / f"run_s{seed}"
    train(cfg, manifest=manifest, run_dir=run_dir, resume=True, show_progress=False, log=lambda s: None)
    return run_dir / "checkpoints" / "best.pt"


def evaluate(checkpoint: Path, manifest: Path, truth_file: Path) -> dict[str, Any]:
    """Test-split accuracy and AUROC of the top-M logits, and the mean heatmap AUROC of the positives."""
    model, cfg = load_model(checkpoint)
    task = cfg.model.tasks[0].name
    with np.load(truth_file) as npz:
        truth = dict(npz)
    logits, labels, heat = [], [], []
    for record in read_manifest(manifest, cfg.model.tasks, "test"):
        inf = infer_slide(
            model,
            make_source(record, cfg),
            memory_size=cfg.selection.memory_size,
            iter_size=cfg.selection.iter_size,
        )
        logits.append(float(inf.logits["topm"][task][0]))
        labels.append(int(record.labels[task]))
        if labels[-1]:
            heat.append(auroc(inf.attention[:, 0], truth[record.slide_id] > 0))
    x, y = np.asarray(logits), np.asarray(labels)
    return {
        "n_test": len(y),
        "accuracy": round(float(((x > 0) == y).mean()), 4),
        "auroc": round(float(auroc(x, y == 1)), 4),
        "heatmap_auroc": round(float(np.nanmean(heat)), 4) if heat else None,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per codec and seed."""
    lines = [
        "| codec | seed | test acc | test AUROC | heatmap AUROC | patches | store bytes | level 0 / TIFF "
        "| PSNR (dB) | prep s | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        psnr = "exact" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}"
        lines.append(
            f"| {r['codec']} | {r['seed']} | {r['accuracy']:.3f} | {r['auroc']:.3f} | {_num(r['heatmap_auroc'])} | "
            f"{r['patches']:,} | {r['store_bytes']:,} | {r['level0_bytes'] / r['tiff_bytes']:.3f} | {psnr} | "
            f"{r['prep_seconds']:.0f} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (reused by a rerun)")
    parser.add_argument("--n-slides", type=int, default=48)
    parser.add_argument("--size", type=int, default=512, help="slide side in pixels")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the rendered slides")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (train.seed)")
    parser.add_argument(
        "--codecs",
        type=parse_codec,
        nargs="+",
        default=[("blosc-lz4", None), ("jpeg", 90), ("jpegxl", 93)],
        help="codec[:quality] per store set, as ips prep --codec / --codec-level",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, repeatable (e.g. --set train.epochs=5)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    patch = int(load_config(ROOT / "configs" / "demo.yaml").model.patch_size)
    rows = render(args.out, args.n_slides, args.size, patch, args.data_seed)
    results = []
    for name, level in args.codecs:
        t0 = time.perf_counter()
        manifest = make_set(args.out, rows, name, level, patch)
        stats = {**store_stats(manifest.parent, args.out / "tiffs"), "prep_seconds": time.perf_counter() - t0}
        for seed in args.seeds:
            t0 = time.perf_counter()
            checkpoint = train_set(manifest.parent, manifest, seed, args.overrides)
            seconds = time.perf_counter() - t0
            metrics = evaluate(checkpoint, manifest, manifest.parent / "truth.npz")
            row = {
                "codec": codec_label(name, level),
                "seed": seed,
                **metrics,
                **stats,
                "train_seconds": seconds,
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    (args.out / "codec_accuracy.json").write_text(
        json.dumps({"args": sys.argv[1:] if argv is None else argv, "rows": results}, indent=1)
    )
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
