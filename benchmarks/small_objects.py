#!/usr/bin/env python
"""One row of the small-object table: [pretrain] -> train -> predict (test split) -> heatmaps -> metrics.

    python benchmarks/small_objects.py --manifest data/smallobj/manifest.csv --out runs/so_pre \\
        --pretrain [--pretrain-set pretrain.epochs=8] -- model.encoder_norm=batch selection.explore=0.25

Runs exactly the CLI commands (printed): `ips pretrain STORES --config CFG --out OUT/pretrain`, `ips train
--config CFG --manifest M --out OUT/run [model.pretrained=OUT/pretrain/encoder.pt] OVERRIDES`, `ips predict`,
`ips heatmap` (positive test slides), then the mean per-slide AUROC of attention vs. `ips_truth/lesion`.
Writes OUT/result.json: accuracy, AUROC (slide level), heatmap AUROC, CPU minutes per stage.

Results page rows: docs/BENCHMARKS.md, "Small objects among similar distractors" and "3D planted-lesion volumes".
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--pretrain", action="store_true")
    p.add_argument("--pretrain-set", nargs="*", default=[])
    p.add_argument("--threads", default="1")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="skip the pretrain, train and predict steps whose outputs OUT already holds (redo heatmaps, metrics)",
    )
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    from ips.cli.main import main as ips
    from ips.eval import CORE_SHARE, lesion_auroc

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu, wall, cmds = {}, {}, []
    manifest = Path(a.manifest)
    with manifest.open() as f:
        rows = list(csv.DictReader(f))
    overrides = list(a.overrides)

    done = {
        "pretrain": out / "pretrain" / "encoder.pt",
        "train": out / "run" / "checkpoints" / "best.pt",
        "predict": out / "pred" / "metrics.json",
    }

    def step(name: str, args: list[str]) -> None:
        cmds.append("ips " + " ".join(args))
        if a.reuse and name in done and done[name].is_file():
            print(f"$ (reused {done[name]}) {cmds[-1]}", flush=True)
            return
        print("$ " + cmds[-1], flush=True)
        c0, t0 = _cpu_s(), time.perf_counter()
        rc = ips(args)
        cpu[name], wall[name] = (_cpu_s() - c0) / 60, (time.perf_counter() - t0) / 60
        if rc != 0:
            raise SystemExit(f"{name} failed with exit status {rc}")

    if a.pretrain:
        stores = [str(manifest.parent / r["path"]) for r in rows]
        step(
            "pretrain",
            [
                "pretrain",
                *stores,
                "--config",
                a.config,
                "--out",
                str(out / "pretrain"),
                "--threads",
                a.threads,
                "--quiet",
                *(["--set", *a.pretrain_set] if a.pretrain_set else []),
            ],
        )
        overrides.append(f"model.pretrained={out / 'pretrain' / 'encoder.pt'}")
    step(
        "train",
        [
            "train",
            "--config",
            a.config,
            "--manifest",
            str(manifest),
            "--out",
            str(out / "run"),
            "--threads",
            a.threads,
            "--quiet",
            "--overwrite",
            *overrides,
        ],
    )
    ckpt = out / "run" / "checkpoints" / "best.pt"
    step(
        "predict",
        [
            "predict",
            "--checkpoint",
            str(ckpt),
            "--manifest",
            str(manifest),
            "--split",
            "test",
            "--out",
            str(out / "pred"),
            "--quiet",
            "--threads",
            a.threads,
        ],
    )
    metrics = json.loads((out / "pred" / "metrics.json").read_text())["metrics"]
    pos = [r for r in rows if r["split"] == "test" and r["label"] == "1"]
    step(
        "heatmap",
        [
            "heatmap",
            "--checkpoint",
            str(ckpt),
            *(str(manifest.parent / r["path"]) for r in pos),
            "--out",
            str(out / "heat"),
            "--top-k",
            "0",
            "--threads",
            a.threads,
        ],
    )
    heat = [(out / "heat" / r["slide_id"] / "scores.zarr", manifest.parent / r["path"]) for r in pos]
    per = [lesion_auroc(scores, store) for scores, store in heat]
    # also without the sliver patches at the target's edge (share in (0, 0.25)): what a reader sees
    core = [lesion_auroc(scores, store, min_share=CORE_SHARE) for scores, store in heat]
    task = next(k.split("/")[0] for k in metrics if k.endswith("/accuracy"))
    result = {
        "accuracy": metrics[f"{task}/accuracy"],
        "auroc": metrics.get(f"{task}/auroc"),
        "heatmap_auroc": float(np.nanmean(per)),
        "heatmap_auroc_core": float(np.nanmean(core)),
        "n_test": metrics.get(f"{task}/n_slides"),
        "cpu_min": cpu,
        "wall_min": wall,
        "commands": cmds,
        "overrides": overrides,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "commands"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
