"""Level-0 tile latency of a running `ips view`, over HTTP: cold (each tile asked once) and warm (asked again).

Usage: python benchmarks/view_latency.py http://127.0.0.1:8765 SLIDE_ID [--tiles 40] [--seed 0]
Prints one JSON line: {"cold_ms": median, "warm_ms": median, "n": tiles, "level": 0, ...}.
Tiles are drawn at random from the level-0 grid (the viewer's level 0 is its finest).

Results page row: docs/BENCHMARKS.md, "A real-size slide end to end"
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request

import numpy as np


def _get(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as r:
        body = r.read()
    return 1e3 * (time.perf_counter() - t0), len(body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base")
    p.add_argument("slide_id")
    p.add_argument("--tiles", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with urllib.request.urlopen(f"{args.base}/api/slides/{args.slide_id}", timeout=600) as r:
        info = json.loads(r.read())
    t, fmt = info["tile_size"], info["tile_format"]
    rows, cols = info["levels"][0]["shape"][-2:]
    rng = np.random.default_rng(args.seed)
    grid = (-(-rows // t), -(-cols // t))
    picks = rng.choice(grid[0] * grid[1], size=min(args.tiles, grid[0] * grid[1]), replace=False)
    urls = [
        f"{args.base}/api/slides/{args.slide_id}/tiles/0/{i // grid[1]}_{i % grid[1]}.{fmt}" for i in picks
    ]
    cold = [_get(u) for u in urls]
    warm = [_get(u) for u in urls]
    print(
        json.dumps(
            {
                "level": 0,
                "level_shape": [rows, cols],
                "tile_size": t,
                "n": len(urls),
                "cold_ms": round(statistics.median(c[0] for c in cold), 2),
                "warm_ms": round(statistics.median(w[0] for w in warm), 2),
                "cold_max_ms": round(max(c[0] for c in cold), 2),
                "mean_bytes": round(statistics.mean(c[1] for c in cold)),
            }
        )
    )


if __name__ == "__main__":
    main()
