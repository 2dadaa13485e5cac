"""`ips demo`: a newcomer's first run, end to end on a laptop CPU in minutes.

1. data: synthetic H&E-like slides, half of them with planted lesions (`ips.synthetic.lesions`),
   written as stores by the same writer as `ips prep`, with a manifest (train/val/test splits);
2. train: `ips.train.train` with the demo config (`DEMO_CONFIG`, the same as `configs/demo.yaml`);
3. predict: `ips predict` on the test slides -> predictions.csv, metrics.json;
4. heatmap: `ips heatmap` on the test slides -> heatmap.png, heatmap.geojson, scores.zarr, top patches;
5. check: the heatmaps must find the planted lesions: per positive test slide, the AUROC of each patch's
   attention against the truth (patches overlapping a lesion), averaged over the slides.

The config lives here, not only in `configs/` (which is not installed with the package); a test keeps
the two equal.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ips.config import ConfigError, ExperimentConfig, apply_overrides, save_config
from ips.eval import lesion_auroc

# == configs/demo.yaml (tests/test_demo.py checks that they stay equal)
DEMO_CONFIG: dict[str, Any] = {
    "model": {
        "encoder": "ips_cnn_small",
        "in_chans": 3,
        "spatial_dims": 2,
        "patch_size": 32,
        "d_model": 64,
        "n_heads": 4,
        "d_mlp": 128,
        "pos_enc": "none",
        "tasks": [{"name": "label", "kind": "binary"}],
    },
}
MARKER = "demo.json"
# the check of the heatmaps: mean per-slide AUROC of attention vs. lesion truth must reach this
LESION_AUROC_CHECK = 0.75


@dataclass(frozen=True)
class DemoSettings:
    """Dataset size and config overrides of one demo setting."""

    n_slides: int
    size: int  # slide side in pixels
    patch_size: int = 32
    seed: int = 0
    overrides: tuple[str, ...] = ()


FULL = DemoSettings(n_slides=48, size=512)
QUICK = DemoSettings(n_slides=24, size=384, overrides=("train.epochs=20",))


def demo_config(overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The demo experiment, with `key=value` overrides."""
    return ExperimentConfig.from_dict(apply_overrides(DEMO_CONFIG, list(overrides)))


@dataclass
class DemoResult:
    out: Path
    seconds: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, Any] = field(default_factory=dict)
    lesion_auroc: float = float("nan")  # mean over positive test slides
    lesion_auroc_per_slide: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    commands: dict[str, str] = field(default_factory=dict)  # printed at the end, ready to paste

    @property
    def check_passed(self) -> bool:
        return self.lesion_auroc >= LESION_AUROC_CHECK

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        d["check"] = {"lesion_auroc_threshold": LESION_AUROC_CHECK, "passed": self.check_passed}
        return d


def _prepare_out(out: Path) -> None:
    """Use an empty or new folder, or redo a previous demo's; never delete anything else."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ConfigError(f"--out {out} is not empty and holds no previous demo: choose a new folder")
        for name in ("data", "run", "predictions", "heatmaps", "config.yaml", MARKER):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def run_demo(
    out: str | Path,
    settings: DemoSettings = FULL,
    *,
    device: str = "auto",
    threads: int | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run the whole demo into `out` (see the module docstring); returns what it measured and wrote.

    `threads`: the torch CPU thread count the caller set (None: not set here); the printed commands carry
    it, so that running them as printed runs what the demo ran."""
    from ips.data.manifest import read_manifest
    from ips.infer.loop import heatmap_slides, load, predict_slides
    from ips.synthetic.lesions import make_lesion_dataset
    from ips.training.loop import train

    out = Path(out)
    _prepare_out(out)
    result = DemoResult(out)
    t_all = time.perf_counter()
    cfg = demo_config([*settings.overrides, f"train.device={device}"])
    run_dir = out / "run"
    checkpoint = run_dir / "checkpoints" / "best.pt"
    pred_dir, heat_dir = out / "predictions", out / "heatmaps"
    manifest = out / "data" / "manifest.csv"
    cmd = demo_commands(
        DemoPaths(out / "config.yaml", manifest, checkpoint, pred_dir, heat_dir),
        device=device,
        threads=threads,
    )

    t0 = time.perf_counter()
    log(
        f"[1/4] data: {settings.n_slides} synthetic slides of {settings.size}x{settings.size} px "
        f"(half with planted lesions) -> {out / 'data'}"
    )
    made = make_lesion_dataset(
        out / "data", settings.n_slides, settings.size, settings.patch_size, settings.seed
    )
    if Path(made) != manifest:  # the printed commands name the manifest before it exists
        raise RuntimeError(f"the demo's data wrote its manifest at {made}, not at {manifest}")
    result.seconds["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    save_config(cfg, out / "config.yaml")
    log(
        f"[2/4] train: {cfg.train.epochs} epochs, M={cfg.selection.memory_size} of each slide's patches, "
        f"{cfg.model.encoder}\n      = {cmd['train']}"
    )
    train(cfg, manifest=manifest, run_dir=run_dir, resume=False, show_progress=show_progress, log=log)
    result.seconds["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"[3/4] predict the test slides\n      = {cmd['predict']}")
    loaded = load(checkpoint, device)
    test = read_manifest(manifest, cfg.model.tasks, "test")
    report = predict_slides(loaded, test, pred_dir, checkpoint=str(checkpoint))
    if report.failures:
        raise RuntimeError(f"ips predict failed on {report.failures[0].name}: {report.failures[0].reason}")
    result.test_metrics = report.metrics
    result.seconds["predict"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"[4/4] heatmaps of the test slides\n      = {cmd['heatmap']}")
    failures = heatmap_slides(loaded, test, heat_dir, checkpoint=str(checkpoint), log=log)
    if failures:
        raise RuntimeError(f"ips heatmap failed on {failures[0].name}: {failures[0].reason}")
    _score_heatmaps(result, test, heat_dir, cfg.model.tasks[0].name)
    result.seconds["heatmap"] = time.perf_counter() - t0
    result.seconds["total"] = time.perf_counter() - t_all

    result.files = {
        "manifest": str(manifest),
        "config": str(out / "config.yaml"),
        "checkpoint": str(checkpoint),
        "curves": str(run_dir / "curves.png"),
        "predictions": str(pred_dir / "predictions.csv"),
        "heatmaps": str(heat_dir),
    }
    first = next((r.slide_id for r in test if r.labels.get(cfg.model.tasks[0].name) == 1), test[0].slide_id)
    result.files["heatmap_png"] = str(heat_dir / first / "heatmap.png")
    result.commands = {"suggest": cmd["suggest"]}
    (out / MARKER).write_text(json.dumps(result.to_dict(), indent=1, default=float))
    return result


def _score_heatmaps(result: DemoResult, test: Sequence[Any], heat_dir: Path, task: str) -> None:
    """The check: per positive test slide, the AUROC of attention against its planted lesions; the mean."""
    for r in test:
        if r.labels.get(task) == 1:
            result.lesion_auroc_per_slide[r.slide_id] = lesion_auroc(
                heat_dir / r.slide_id / "scores.zarr", r.path
            )
    values = [v for v in result.lesion_auroc_per_slide.values() if not np.isnan(v)]
    result.lesion_auroc = float(np.mean(values)) if values else float("nan")


def summary(result: DemoResult) -> str:
    """What a newcomer reads at the end: metrics, the check, where the files are, how long it took."""
    m = result.test_metrics
    task = next((k.split("/")[0] for k in m if k.endswith("/auroc")), "label")
    lines = [
        f"test slides: accuracy {m.get(f'{task}/accuracy', float('nan')):.3f}, "
        f"AUROC {_num(m.get(f'{task}/auroc'))} (slide-level, {int(m.get(f'{task}/n_slides', 0))} slides)",
        f"heatmaps find the lesions: patch-level AUROC of attention vs. planted lesions {result.lesion_auroc:.3f} "
        f"(mean of {len(result.lesion_auroc_per_slide)} positive test slides; check >= {LESION_AUROC_CHECK}: "
        f"{'passed' if result.check_passed else 'NOT passed'})",
        "files:",
        *(f"  {k:12s} {v}" for k, v in result.files.items()),
        "view them in the browser: " + view_command(result.files),
        *(
            f"where to annotate next (the training slides to outline first): {c}"
            for c in result.commands.values()
        ),
        "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()),
    ]
    return "\n".join(lines)


def view_command(files: dict[str, str]) -> str:
    """The `ips view` command that shows the demo's test slides with their heatmaps and predictions."""
    q = shlex.quote
    return (
        f"ips view --manifest {q(files['manifest'])} --split test --heatmaps {q(files['heatmaps'])} "
        f"--predictions {q(files['predictions'])}"
    )


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo writes what its printed commands read and write."""

    config: Path
    manifest: Path
    checkpoint: Path
    predictions: Path
    heatmaps: Path


def demo_commands(paths: DemoPaths, *, device: str = "auto", threads: int | None = None) -> dict[str, str]:
    """The command lines that redo each step of the demo (`train`, `predict`, `heatmap`) and take it one
    step further (`suggest`), every path quoted for a POSIX shell: ready to paste, no placeholders.

    `threads`: the torch CPU thread count the demo ran with (None: not set), so the commands run what the
    demo ran."""
    q = shlex.quote
    tail = f" --device {q(device)}" + ("" if threads is None else f" --threads {threads}")
    config, manifest, ckpt = q(str(paths.config)), q(str(paths.manifest)), q(str(paths.checkpoint))
    run_dir = q(str(paths.checkpoint.parent.parent))
    return {
        "train": f"ips train --config {config} --manifest {manifest} --out {run_dir}"
        + ("" if threads is None else f" --threads {threads}"),
        "predict": f"ips predict --checkpoint {ckpt} --manifest {manifest} --split test "
        f"--out {q(str(paths.predictions))}{tail}",
        "heatmap": f"ips heatmap --checkpoint {ckpt} --manifest {manifest} --split test "
        f"--out {q(str(paths.heatmaps))}{tail}",
        "suggest": f"ips suggest --checkpoint {ckpt} --manifest {manifest} --split train --budget 3 "
        f"--out {q(str(paths.predictions.parent / 'suggest'))}{tail}",
    }


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"
