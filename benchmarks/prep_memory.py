"""Where `ips prep`'s memory goes: per phase, the peak of traced memory (tracemalloc: Python and numpy
allocations) over the phase's start, what stays held after it, and the process's max RSS so far.

    python benchmarks/prep_memory.py SLIDE [--patch-size 256] [--mpp 0.5] [--store-from grid] [--dynamic-heap]

The store goes to a temporary folder (removed at the end). Phases: `_plan`, `_write_levels` (every
pyramid level from one pass over the source), `_mask` (tissue mask of a low level), `_grid` (with
`_write_grid` inside it), `_thumbnail`. Compare a small slide with a large one made by the same generator
(`ips synth big-slide`) to see which phase grows with the slide.

Results page row: docs/BENCHMARKS.md, "A real-size slide end to end".
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import data_prep.convert as convert
from data_prep.convert import PrepOptions, prep_file
from data_prep.heap import return_large_blocks

PHASES = ("_plan", "_write_levels", "_mask", "_grid", "_write_grid", "_thumbnail")


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def traced(name: str, rows: list[dict]) -> None:
    """Replace `data_prep.convert.<name>` by a wrapper that records the phase's memory into `rows`."""
    fn = getattr(convert, name)

    def wrapper(*args, **kwargs):
        tracemalloc.reset_peak()
        start, t0 = tracemalloc.get_traced_memory()[0], time.perf_counter()
        out = fn(*args, **kwargs)
        held, peak = tracemalloc.get_traced_memory()
        rows.append(
            {
                "phase": name,
                "peak_over_start_mib": (peak - start) / 2**20,
                "held_after_mib": held / 2**20,
                "max_rss_mib": max_rss_mib(),
                "seconds": time.perf_counter() - t0,
            }
        )
        return out

    setattr(convert, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide", type=Path)
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--store-from", default="level0")
    ap.add_argument(
        "--dynamic-heap",
        action="store_true",
        help="leave glibc's mmap threshold dynamic (before data_prep.heap)",
    )
    args = ap.parse_args()
    rows: list[dict] = []
    for name in PHASES:
        traced(name, rows)
    if not args.dynamic_heap:
        return_large_blocks()  # as `ips prep` does
    before = max_rss_mib()
    work = Path(tempfile.mkdtemp(prefix="prep_memory_"))
    try:
        tracemalloc.start()
        options = PrepOptions(patch_size=args.patch_size, mpp=args.mpp, threads=1, store_from=args.store_from)
        result = prep_file(args.slide, work, options=options)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if result.status != "done":
        raise SystemExit(f"{args.slide}: {result.reason}")
    print(f"{args.slide.name}: max RSS {before:.0f} MiB before prep, {max_rss_mib():.0f} MiB at the end")
    print("| phase | traced peak over start (MiB) | held after (MiB) | max RSS so far (MiB) | s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| `{r['phase']}` | {r['peak_over_start_mib']:.1f} | {r['held_after_mib']:.1f} | "
            f"{r['max_rss_mib']:.0f} | {r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
