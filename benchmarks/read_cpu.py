"""Host CPU per patch of `ZarrPatchSource.read`, for patches smaller than chunks (the per-patch copy path).

    python benchmarks/read_cpu.py [--patch-size 32] [--n 8192] [--chunk 256] [--repeat 5]

A throughput store (`ips.bench.stores.bench_store`, every patch real pixels; the writer puts 32-px
patches in 64-px chunks) is read in index order, `--chunk` patches per call, by one read thread; the
figure is the process CPU time of the fastest pass over all patches, per patch. Run it on two commits
one after the other, twice, to compare (the machine may be shared: CPU time is the steadier figure).

Results page row: docs/BENCHMARKS.md, "Selection costs little beyond the encoder" (host CPU per patch read).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from ips.bench.stores import bench_store
from ips.data.zarr_source import ZarrPatchSource


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patch-size", type=int, default=32)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=256, help="patches per read call (I)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir", default=None, help="where the store is kept (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ips-read-cpu-") as tmp:
        store = bench_store(args.workdir or tmp, args.n, patch_size=args.patch_size, tissue_patches=None)
        source = ZarrPatchSource(store, read_threads=1)
        n = len(source)

        def one_pass() -> None:
            for start in range(0, n, args.chunk):
                source.read(np.arange(start, min(n, start + args.chunk)))

        one_pass()  # warm: shard indexes cached, pages in the OS cache
        best = float("inf")
        for _ in range(args.repeat):
            t = time.process_time()
            one_pass()
            best = min(best, time.process_time() - t)
        print(
            f"{n} patches of {args.patch_size} px, {args.chunk} per read: {best / n * 1e6:.1f} us CPU per patch"
        )


if __name__ == "__main__":
    main()
