#!/usr/bin/env python
"""Peak host memory and time of `ips heatmap` / `ips predict` as the slide grows.

    python benchmarks/heatmap_memory.py --out /tmp/bench_hm --sides 512 2048 4096 [--json FILE]

Per side S: an S x S RGB store with 16-px patches over the whole image (S^2 / 256 patches; 5% of it
random pixels, the rest unwritten background, so stores stay small), a tiny untrained checkpoint; each
command runs in a fresh subprocess that reports its peak RSS (VmHWM) and wall time. Overlays are drawn
on a level of at most `--thumb-size` pixels.

Results page row: docs/BENCHMARKS.md, "Heatmap and predict memory as the slide grows".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import sys
from ips.cli.main import main
rc = main(sys.argv[1:])
with open("/proc/self/status") as f:
    print("VMHWM_KB", next(line.split()[1] for line in f if line.startswith("VmHWM:")))
sys.exit(rc)
"""


def measure(argv: list[str]) -> tuple[int, float]:
    """(peak RSS bytes, seconds) of `ips ARGV` in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return int(proc.stdout.split("VMHWM_KB")[1].split()[0]) * 1024, seconds


def make_store(out: Path, slide_id: str, side: int, patch: int, fill: float) -> Path:
    """A side x side RGB store over a grid of every patch: the first `fill` share of rows random pixels,
    the rest background (unwritten chunks)."""
    from data_prep.convert import PrepOptions, convert_array

    img = np.full((3, side, side), 255, dtype=np.uint8)
    n = max(1, int(round(side * fill)))
    img[:, :n, :] = np.random.default_rng(0).integers(0, 255, (3, n, side), dtype=np.uint8)
    options = PrepOptions(
        patch_size=patch, level=0, min_tissue=0.0, thumbnail=False, hash_source=False, threads=1
    )
    mask = np.ones((side, side), dtype=bool)
    return convert_array(img, out, slide_id, options=options, background=255, mask=mask)


def write_checkpoint(path: Path, patch: int, memory_size: int, iter_size: int) -> Path:
    """An untrained tiny model (`ips_cnn_tiny`, one binary task) saved as a checkpoint."""
    import torch

    from ips.config import ExperimentConfig
    from ips.model.checkpoint import save_checkpoint
    from ips.model.ips_model import build_model

    cfg = ExperimentConfig.from_dict(
        {
            "model": {
                "encoder": "ips_cnn_tiny",
                "in_chans": 3,
                "patch_size": patch,
                "spatial_dims": 2,
                "d_model": 32,
                "n_heads": 4,
                "d_mlp": 32,
                "tasks": [{"name": "a", "kind": "binary"}],
            },
            "selection": {"memory_size": memory_size, "iter_size": iter_size, "prefetch": 1},
            "data": {"augment": False, "read_threads": 1},
            "train": {"device": "cpu"},
        }
    )
    torch.manual_seed(0)
    save_checkpoint(path, model=build_model(cfg.model), config=cfg, epoch=0, metrics={})
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--thumb-size", type=int, default=512)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = write_checkpoint(out / "m.pt", patch=16, memory_size=32, iter_size=256)
    rows = []
    for side in args.sides:
        store = out / "stores" / f"s{side}.zarr"
        if not store.exists():
            make_store(out / "stores", f"s{side}", side=side, patch=16, fill=0.05)
        row: dict[str, object] = {"side": side, "n_patches": (side // 16) ** 2}
        for command, extra in (
            ("heatmap", ["--thumb-size", str(args.thumb_size), "--top-k", "16"]),
            ("predict", []),
        ):
            peak, seconds = measure(
                [command, "--checkpoint", str(ckpt), str(store), "--out", str(out / command), *extra]
            )
            row[f"{command}_peak_rss_bytes"], row[f"{command}_seconds"] = peak, round(seconds, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
