"""Benchmark `ips prep`: conversion time / decode-only time (same reader, same threads, same blocks,
one run), scaling with --workers over copies of the slide, and store size / source size.

    IPS_TEST_DATA=../shared/data python benchmarks/prep.py --threads 1 2 --mosaic 3 \
        --workers 1 2 4 --copies 4

Prints a markdown table (paste into docs/BENCHMARKS.md) and, with --json FILE, writes the figures.

Results page row: docs/BENCHMARKS.md, "Prep speed".
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from data_prep.cli import register
from data_prep.convert import PrepOptions, prep_file
from data_prep.readers import open_reader
from data_prep.writer import chunk_layout, iter_blocks, run_bounded

REPO = Path(__file__).resolve().parents[1]


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def decode_only(src: Path, patch: int, threads: int) -> tuple[float, float]:
    """`(wall, cpu)` seconds to read level 0 through the reader, block by block as the writer does
    (results dropped). CPU time (all threads of this process) is steadier than wall time on a shared
    machine."""
    with open_reader(src) as reader:
        dims = reader.spatial_dims
        _, shard = chunk_layout((patch,) * dims, (patch,) * dims, 8 if dims == 2 else 4)
        t0, c0 = time.perf_counter(), time.process_time()

        def task(start, size):
            return lambda: reader.read_region(start, size)

        run_bounded((task(s, n) for s, n in iter_blocks(reader.spatial_shape, shard)), threads)
        return time.perf_counter() - t0, time.process_time() - c0


def convert_once(
    src: Path, work: Path, patch: int, threads: int, thumbnail: bool = True
) -> tuple[float, float, Path]:
    """`(wall, cpu)` seconds for a complete `prep_file` (into a fresh folder: no old store to remove)."""
    out = Path(tempfile.mkdtemp(dir=work))
    options = PrepOptions(patch_size=patch, threads=threads, thumbnail=thumbnail)
    t0, c0 = time.perf_counter(), time.process_time()
    result = prep_file(src, out, options=options)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if result.status != "done":
        raise SystemExit(f"conversion failed: {result.reason}")
    assert result.store is not None
    return seconds, cpu, result.store


def pixels(src: Path) -> int:
    with open_reader(src) as reader:
        return int(reader.shape[1]) * int(reader.shape[2])


def make_mosaic(src: Path, path: Path, k: int) -> Path:
    """A k x k mosaic of the slide's level 0 as a tiled JPEG TIFF (240-px tiles, quality 30 like the
    source), written tile row by tile row; a stand-in for a larger scan with the same content."""
    import numpy as np
    import tifffile

    with open_reader(src) as reader:
        img = reader.read_region((0, 0), reader.spatial_shape).transpose(1, 2, 0)  # (Y, X, 3)
    h, w = (img.shape[0] // 240) * 240, (img.shape[1] // 240) * 240
    tile = np.ascontiguousarray(img[:h, :w])

    def tiles():
        for _ in range(k):  # mosaic rows
            for ty in range(0, h, 240):
                for _ in range(k):
                    for tx in range(0, w, 240):
                        yield tile[ty : ty + 240, tx : tx + 240]

    tifffile.imwrite(
        path,
        tiles(),
        shape=(k * h, k * w, 3),
        dtype=np.uint8,
        tile=(240, 240),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": 30},
        resolution=(1e4 / 0.499, 1e4 / 0.499),
        resolutionunit="CENTIMETER",
    )
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_src = (
        Path(os.environ.get("IPS_TEST_DATA", REPO.parent / "shared" / "data")) / "cmu_small_region.svs"
    )
    ap.add_argument("--src", type=Path, default=default_src)
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3, help="best of R for each timing")
    ap.add_argument(
        "--mosaic",
        type=int,
        default=0,
        help="also time a KxK mosaic of the slide (JPEG-tiled TIFF, a larger slide)",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    src = args.src
    if not src.is_file():
        raise SystemExit(f"{src} not found (set IPS_TEST_DATA or --src)")
    work = Path(tempfile.mkdtemp(prefix="bench_prep_"))
    report: dict = {
        "source": str(src),
        "source_bytes": src.stat().st_size,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "ratio": [],
        "workers": [],
    }
    try:
        sources = [src]
        if args.mosaic > 1:
            sources.append(make_mosaic(src, work / f"mosaic{args.mosaic}x{args.mosaic}.tif", args.mosaic))
        for source in sources:
            for threads in args.threads:
                # interleaved, best of R: the machine is shared, so both see the same load
                decode, convert = [], []
                for _ in range(args.repeat):
                    decode.append(decode_only(source, args.patch_size, threads))
                    *times, store = convert_once(source, work, args.patch_size, threads)
                    convert.append(tuple(times))
                    shutil.rmtree(store.parent)
                dw, dc = min(d[0] for d in decode), min(d[1] for d in decode)
                cw, cc = min(c[0] for c in convert), min(c[1] for c in convert)
                report["ratio"].append(
                    {
                        "source": source.name,
                        "pixels": pixels(source),
                        "threads": threads,
                        "decode_s": dw,
                        "convert_s": cw,
                        "ratio": cw / dw,
                        "decode_cpu_s": dc,
                        "convert_cpu_s": cc,
                        "cpu_ratio": cc / dc,
                    }
                )
        *_, store = convert_once(src, work, args.patch_size, max(args.threads))
        report["store_bytes"] = du(store)
        report["level0_bytes"] = du(store / "0")
        copies = work / "copies"
        copies.mkdir()
        for i in range(args.copies):
            os.symlink(src.resolve(), copies / f"copy{i}{src.suffix}")
        for workers in args.workers:
            out = work / f"w{workers}"
            # `ips prep`'s own entry (data_prep.cli.run), in this process: the time of the other
            # subcommands' imports at `ips` start-up is not prep's
            parser = argparse.ArgumentParser()
            register(parser.add_subparsers())
            cli_args = parser.parse_args(
                [
                    "prep",
                    *map(str, sorted(copies.iterdir())),
                    "--out",
                    str(out),
                    "--workers",
                    str(workers),
                    "--patch-size",
                    str(args.patch_size),
                ]
            )
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                status = cli_args.func(cli_args)
            wall = time.perf_counter() - t0
            if status != 0:
                raise SystemExit(f"ips prep --workers {workers} failed")
            report["workers"].append(
                {
                    "workers": workers,
                    "inputs": args.copies,
                    "wall_s": wall,
                    "slides_per_s": args.copies / wall,
                }
            )
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"source {src.name}: {report['source_bytes'] / 1e6:.2f} MB, {report['cpus']} CPUs")
    print(
        "\n| source | Mpx | threads | decode wall (s) | convert wall (s) | wall ratio | decode CPU (s) "
        "| convert CPU (s) | CPU ratio |\n|---|---|---|---|---|---|---|---|---|"
    )
    for r in report["ratio"]:
        print(
            f"| {r['source']} | {r['pixels'] / 1e6:.0f} | {r['threads']} | {r['decode_s']:.3f} | "
            f"{r['convert_s']:.3f} | {r['ratio']:.2f} | {r['decode_cpu_s']:.3f} | {r['convert_cpu_s']:.3f} "
            f"| {r['cpu_ratio']:.2f} |"
        )
    print(
        f"\nstore {report['store_bytes'] / 1e6:.2f} MB (level 0 {report['level0_bytes'] / 1e6:.2f} MB) = "
        f"{report['store_bytes'] / report['source_bytes']:.2f}x the source file"
    )
    if report["workers"]:
        print("\n| workers | inputs | wall (s) | slides/s |\n|---|---|---|---|")
        for r in report["workers"]:
            print(f"| {r['workers']} | {r['inputs']} | {r['wall_s']:.2f} | {r['slides_per_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
