"""`ips bench learn`: does the documented path learn tasks nobody tuned it for? A family x seed matrix.

For each family (`ips.synthetic.families`) and seed: generate the family's stores as `ips prep
--patch-size P` makes them, then run the documented commands exactly:

    [ips pretrain STORES --config CFG --out RUN/pretrain]                      (--pretrain)
    ips train --config CFG --manifest M --out RUN/train train.seed=S [model.pretrained=...] [SIZE]
    ips predict --checkpoint RUN/train/checkpoints/best.pt --manifest M --split test --out RUN/pred
    ips heatmap --checkpoint ... POSITIVE_TEST_STORES --out RUN/heat

CFG is `configs/demo.yaml` for 2D families and `configs/volume3d.yaml` for volumes, the latter with only
the overrides a CPU user is allowed (`VOLUME_OVERRIDES`). SIZE: `train.epochs=E` when `--epochs` asks for
a shorter run than the config's (a reduced run; the JSON records it). The data seed is the run's seed. Each command runs as its own process (`python -m ips`), its output in
RUN/commands.log.

Heatmap AUROC, per positive test slide then averaged: the attention of each patch against the truth
"this patch holds the target": positives are the patches with a share of the target >= min(0.25, half the
slide's largest share), negatives the patches the target does not touch; the sliver patches in between
(a corner of the object, which look like background) are left out. Distractor patches are negatives.

CPU minutes: the user + system CPU time of the commands above (data generation excluded).
"""

from __future__ import annotations

import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CORE_SHARE = 0.25
# what the volume checks may change in configs/volume3d.yaml: a CPU-sized model and selection
VOLUME_OVERRIDES = (
    "model.patch_size=16",
    "model.encoder=ips_cnn_small",
    "model.d_model=64",
    "model.n_heads=4",
    "model.d_mlp=128",
    "selection.memory_size=8",
    "selection.iter_size=64",
    "train.batch_size=4",
)
ROW_KEYS = ("family", "seed", "test_accuracy", "heatmap_auroc", "cpu_minutes")


@dataclass(frozen=True)
class LearnSettings:
    """One matrix: `families` (letters), `seeds`, where to work (`out`), the configs folder, and the size.

    `n_slides` None: each family's full size; `epochs` None: the config's; `overrides`: extra `key=value`
    for `ips train` (measurements of alternatives, not the documented path: recorded per run)."""

    families: tuple[str, ...]
    seeds: tuple[int, ...]
    out: Path
    configs: Path
    digits: Path | None = None
    n_slides: int | None = None
    epochs: int | None = None
    pretrain: bool = False
    threads: int = 1
    overrides: tuple[str, ...] = field(default_factory=tuple)
    grids: tuple[str, ...] = field(default_factory=tuple)


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def patch_truth_auroc(attention: np.ndarray, share: np.ndarray) -> float:
    """AUROC of `attention (N,)` against the target `share (N,)` per patch (see the module docstring);
    NaN when the slide has no patch of either kind."""
    from ips.model.metrics import auroc

    attention, share = np.asarray(attention, np.float64), np.asarray(share, np.float64)
    if share.size == 0 or share.max() <= 0:
        return float("nan")
    cut = min(CORE_SHARE, 0.5 * float(share.max()))
    keep = (share >= cut) | (share == 0)
    return auroc(attention[keep], share[keep] >= cut)


def heatmap_auroc(scores_path: str | Path, store_path: str | Path) -> float:
    """`patch_truth_auroc` of a heatmap's scores.zarr (task 0) against its store's `ips_truth/lesion`."""
    import zarr

    from ips.format.names import DEFAULT_GRID
    from ips.synthetic import truth_key

    scores = zarr.open_group(str(scores_path), mode="r")
    attention = np.asarray(scores["attention"][...])[:, 0]
    key = truth_key("lesion", scores.attrs.get("grid", DEFAULT_GRID))
    share = np.asarray(zarr.open_group(str(store_path), mode="r")[key][...])
    return patch_truth_auroc(attention, share)


class _Steps:
    """Runs `ips` commands as child processes (`python -m ips`, exactly as a user types them),
    recording each command line and its CPU time (the child's user + system time)."""

    def __init__(self, log: Path) -> None:
        self.commands: list[str] = []
        self.cpu: dict[str, float] = {}
        self.log = log

    def __call__(self, name: str, args: list[str]) -> None:
        self.commands.append("ips " + " ".join(args))
        print("$ " + self.commands[-1], flush=True)
        c0 = _children_cpu_s()
        with self.log.open("a") as out:
            out.write(f"$ {self.commands[-1]}\n")
            out.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log follows the run
            rc = subprocess.run(
                [sys.executable, "-m", "ips", *args], stdout=out, stderr=out, env=env
            ).returncode
        self.cpu[name] = (_children_cpu_s() - c0) / 60
        if rc != 0:
            raise RuntimeError(f"{name} failed with exit status {rc} (see {self.log}): {self.commands[-1]}")


def train_overrides(spatial_dims: int, seed: int, settings: LearnSettings) -> list[str]:
    """`ips train` overrides of a run: the volumes' CPU-sized model, the seed, the reduced epochs, extras."""
    overrides = list(VOLUME_OVERRIDES) if spatial_dims == 3 else []
    overrides.append(f"train.seed={seed}")
    if settings.epochs is not None:
        overrides.append(f"train.epochs={settings.epochs}")
    return overrides + list(settings.overrides)


def run_one(key: str, seed: int, settings: LearnSettings) -> dict[str, Any]:
    """One family x seed: data, [pretrain], train, predict, heatmaps, metrics. Returns the run's record."""
    from ips.synthetic.families import family

    fam = family(key)
    run = settings.out / f"{key}_seed{seed}"
    n = settings.n_slides or fam.default_slides
    t0 = time.perf_counter()
    manifest = run / "data" / "manifest.csv"
    if not manifest.is_file():
        from ips.synthetic._store import GridSpec

        grids = [GridSpec.parse(g) for g in settings.grids]
        manifest = fam.generate(run / "data", n, seed=seed, digits=settings.digits, extra_grids=grids)
    data_minutes = (time.perf_counter() - t0) / 60
    with manifest.open() as f:
        rows = list(csv.DictReader(f))
    config = settings.configs / ("volume3d.yaml" if fam.spatial_dims == 3 else "demo.yaml")
    overrides = train_overrides(fam.spatial_dims, seed, settings)
    threads = ["--threads", str(settings.threads)]
    for old in (
        "pretrain",
        "train",
        "pred",
        "heat",
        "commands.log",
    ):  # a rerun redoes every step but the data
        target = run / old
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    step = _Steps(run / "commands.log")
    if settings.pretrain:
        stores = [str(manifest.parent / r["path"]) for r in rows if r["split"] == "train"]
        pre = run / "pretrain"
        model_keys = [o for o in overrides if o.startswith("model.")]
        set_args = ["--set", *model_keys] if model_keys else []
        step(
            "pretrain",
            ["pretrain", *stores, "--config", str(config), "--out", str(pre), *threads, "--quiet", *set_args],
        )
        overrides.append(f"model.pretrained={pre / 'encoder.pt'}")
    train_dir = run / "train"
    step(
        "train",
        ["train", "--config", str(config), "--manifest", str(manifest), "--out", str(train_dir), "--no-resume",
         "--quiet", *threads, *overrides],
    )  # fmt: skip
    ckpt = train_dir / "checkpoints" / "best.pt"
    pred = run / "pred"
    step(
        "predict",
        ["predict", "--checkpoint", str(ckpt), "--manifest", str(manifest), "--split", "test", "--out", str(pred),
         "--quiet", *threads],
    )  # fmt: skip
    metrics = json.loads((pred / "metrics.json").read_text())["metrics"]
    pos = [r for r in rows if r["split"] == "test" and r["label"] == "1"]
    heat = run / "heat"
    stores = [str(manifest.parent / r["path"]) for r in pos]
    step(
        "heatmap",
        ["heatmap", "--checkpoint", str(ckpt), *stores, "--out", str(heat), "--top-k", "0", *threads],
    )
    per = [heatmap_auroc(heat / r["slide_id"] / "scores.zarr", manifest.parent / r["path"]) for r in pos]
    task = next(k.split("/")[0] for k in metrics if k.endswith("/accuracy"))
    record = {
        "family": key,
        "seed": seed,
        "test_accuracy": float(metrics[f"{task}/accuracy"]),
        "heatmap_auroc": float(np.nanmean(per)) if per else float("nan"),
        "cpu_minutes": round(sum(step.cpu.values()), 3),
        "test_auroc": metrics.get(f"{task}/auroc"),
        "n_slides": n,
        "n_test": metrics.get(f"{task}/n_slides"),
        "epochs": settings.epochs,
        "pretrain": settings.pretrain,
        "cpu_minutes_by_step": {k: round(v, 3) for k, v in step.cpu.items()},
        "data_minutes": round(data_minutes, 3),
        "commands": step.commands,
    }
    (run / "result.json").write_text(json.dumps(record, indent=1))
    return record


def run_learn(settings: LearnSettings) -> dict[str, Any]:
    """Every family x seed of `settings`, in order: `{"rows": [...], "runs": [...], "settings": {...}}`.

    `rows` hold exactly `ROW_KEYS`; `runs` the full record of each (commands, CPU per step, test AUROC)."""
    runs = [run_one(key, seed, settings) for key in settings.families for seed in settings.seeds]
    return {
        "rows": [{k: r[k] for k in ROW_KEYS} for r in runs],
        "runs": runs,
        "settings": {
            "n_slides": settings.n_slides,
            "epochs": settings.epochs,
            "pretrain": settings.pretrain,
            "threads": settings.threads,
            "overrides": list(settings.overrides),
            "grids": list(settings.grids),
        },
    }


def learn_table(result: dict[str, Any]) -> str:
    """The matrix as a Markdown table: family, seed, test accuracy, heatmap AUROC, CPU minutes."""
    lines = ["| family | seed | test accuracy | heatmap AUROC | CPU min |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['family']} | {r['seed']} | {r['test_accuracy']:.3f} | {r['heatmap_auroc']:.3f} | "
            f"{r['cpu_minutes']:.1f} |"
        )
    return "\n".join(lines)


def parse_families(text: str) -> tuple[str, ...]:
    """`a,b` -> ('a', 'b'); ValueError naming an unknown letter."""
    from ips.synthetic.families import family

    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    for k in keys:
        family(k)
    if not keys:
        raise ValueError("no family given")
    return keys


def write_result(path: str | Path, result: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, allow_nan=True))
    return path


def default_configs() -> Path:
    """The repository's configs/ folder (configs are not installed with the package)."""
    return Path(__file__).resolve().parents[2] / "configs"


def seeds_of(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(",") if s.strip())


__all__: Sequence[str] = (
    "LearnSettings",
    "heatmap_auroc",
    "learn_table",
    "parse_families",
    "patch_truth_auroc",
    "run_learn",
    "run_one",
)
