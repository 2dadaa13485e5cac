#!/usr/bin/env python
"""Peak host memory and time of `ips heatmap` / `ips predict` as the slide grows.

    python tools/bench_heatmap_memory.py --out /tmp/bench_hm --sides 512 2048 4096 [--json FILE]

Per side S: an S x S RGB store with 16-px patches over the whole image (S^2 / 256 patches; 5% of it
random pixels, the rest unwritten background, so stores stay small), a tiny untrained checkpoint; each
command runs in a fresh subprocess that reports its peak RSS (VmHWM) and wall time. Overlays are drawn
on a level of at most `--thumb-size` pixels.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

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
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return int(proc.stdout.split("VMHWM_KB")[1].split()[0]) * 1024, seconds


def main(argv: list[str] | None = None) -> int:
    from inference_fixtures import make_store, tiny_cfg, write_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--thumb-size", type=int, default=512)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = write_checkpoint(out / "m.pt", tiny_cfg(patch=16, memory_size=32, iter_size=256))
    rows = []
    for side in args.sides:
        store = out / "stores" / f"s{side}.zarr"
        if not store.exists():
            make_store(out / "stores", f"s{side}", size=(side, side), patch=16, fill=0.05)
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
