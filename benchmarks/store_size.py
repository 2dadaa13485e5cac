"""Store size and codecs, side by side in one run on one slide: store bytes / source bytes,
PSNR of level 0 against the lossless store, prep CPU / decode CPU, and patch reads per second per core.

    IPS_TEST_DATA=../shared/data python benchmarks/store_size.py [--repeat 20] [--prep-repeat 3] [--json FILE]

Stores (all `--patch-size 256`, one thread, no thumbnail, in a temporary folder): level0 with zstd
level 1 (the default) and blosc-lz4 (the default before), `--store-from grid --mpp 1.0` with both, and
jpeg / jpegxl / webp at their default quality at level 0. PSNR is over the whole level 0 against the default store's level 0
(for `--store-from grid`: against the default store's level 1, which it should equal). Reads: every
written 256-px chunk of level 0 as one patch, through the direct shard reader (`ips.data.chunk_io`) on
the calling thread, `--repeat` passes; patches per second of process CPU time. Prep CPU: the fastest
of `--prep-repeat` preps of each store.

Results page row: docs/BENCHMARKS.md, "Store size and codecs".
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from data_prep.convert import PrepOptions, prep_file
from data_prep.readers import open_reader
from data_prep.writer import chunk_layout, iter_blocks, run_bounded
from ips.data.chunk_io import ChunkReader
from ips.data.store import open_store

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "level0 zstd (default)": {},
    "level0 blosc-lz4": {"codec": "blosc-lz4"},
    "grid --mpp 1.0 zstd (default)": {"store_from": "grid", "mpp": 1.0},
    "grid --mpp 1.0 blosc-lz4": {"store_from": "grid", "mpp": 1.0, "codec": "blosc-lz4"},
    "level0 jpeg": {"codec": "jpeg"},
    "level0 jpegxl": {"codec": "jpegxl"},
    "level0 webp": {"codec": "webp"},
}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def decode_cpu(src: Path, patch: int = 256) -> float:
    """Process CPU seconds to decode the source's level 0 once, shard by shard as prep reads it (the
    best of 3; the same measure as `benchmarks/prep.py`'s decode-only pass, one thread)."""
    best = float("inf")
    for _ in range(3):
        with open_reader(src) as reader:
            dims = reader.spatial_dims
            _, shard = chunk_layout((patch,) * dims, (patch,) * dims, 8 if dims == 2 else 4)
            c0 = time.process_time()

            def task(start, size, reader=reader):
                return lambda: reader.read_region(start, size)

            run_bounded((task(s, n) for s, n in iter_blocks(reader.spatial_shape, shard)), 1)
            best = min(best, time.process_time() - c0)
    return best


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def read_rate(store: Path, repeat: int) -> tuple[int, float]:
    """`(patches, patches per CPU second)`: every written chunk of level 0, read as a patch."""
    opened = open_store(store)
    array = opened.level(0)
    reader = ChunkReader.for_array(array, written=opened.written_keys("0"))
    assert reader is not None
    c, cy, cx = array.chunks
    grid = [
        (0, y, x)
        for y in range(0, array.shape[1] - cy + 1, cy)
        for x in range(0, array.shape[2] - cx + 1, cx)
    ]
    lo = np.asarray(grid, dtype=np.int64)
    out = np.empty((len(lo), c, cy, cx), np.uint8)
    best = float("inf")
    for _ in range(repeat):
        c0 = time.process_time()
        reader.read_boxes(lo, (c, cy, cx), out, np.arange(len(lo)))
        best = min(best, time.process_time() - c0)
    return len(lo), len(lo) / best


def measure(src: Path, work: Path, repeat: int, prep_repeat: int = 3) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    size = src.stat().st_size
    decode = decode_cpu(src)
    reference: np.ndarray | None = None
    for name, extra in CASES.items():
        options = PrepOptions(patch_size=256, threads=1, thumbnail=False, **extra)
        cpu = float("inf")
        for _ in range(prep_repeat):  # the fastest prep counts (the first also pays lazy imports)
            out = Path(tempfile.mkdtemp(dir=work))
            c0 = time.process_time()
            result = prep_file(src, out, options=options)
            cpu = min(cpu, time.process_time() - c0)
        if result.status != "done":
            raise SystemExit(f"{name}: {result.reason}")
        store = result.store
        assert store is not None
        opened = open_store(store)
        level0 = np.asarray(opened.level(0)[...])
        if reference is None:  # the first case is the lossless level-0 store
            reference = level0
            reference_l1 = np.asarray(opened.level(1)[...])
        ref = reference_l1 if extra.get("store_from") == "grid" else reference
        n, rate = read_rate(store, repeat)
        rows[name] = {
            "store_bytes": du(store),
            "store_over_source": du(store) / size,
            "psnr_db": psnr(level0, ref),
            "prep_cpu_s": cpu,
            "prep_over_decode_cpu": cpu / decode,
            "read_patches": n,
            "read_patches_per_cpu_s": rate,
        }
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
    return {"source_bytes": size, "decode_cpu_s": decode, "rows": rows}


def table(result: dict) -> str:
    lines = [
        "| store | bytes | / SVS | PSNR level 0 (dB) | prep CPU / decode CPU | 256-px patch reads / CPU s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["rows"].items():
        p = "exact" if r["psnr_db"] == float("inf") else f"{r['psnr_db']:.1f}"
        lines.append(
            f"| {name} | {r['store_bytes']:,} | {r['store_over_source']:.2f} | {p} | "
            f"{r['prep_over_decode_cpu']:.2f} | {r['read_patches_per_cpu_s']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("IPS_TEST_DATA", REPO.parent / "shared" / "data")) / "cmu_small_region.svs"
    ap.add_argument("--src", type=Path, default=default)
    ap.add_argument("--repeat", type=int, default=20, help="read passes; the fastest counts")
    ap.add_argument("--prep-repeat", type=int, default=3, help="preps per store; the fastest counts")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        result = measure(args.src, Path(work), args.repeat, args.prep_repeat)
    print(
        f"source {args.src.name}: {result['source_bytes']:,} bytes; decode CPU {result['decode_cpu_s']:.3f} s"
    )
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
