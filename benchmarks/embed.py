"""Benchmark the features path: `ips prep --encoder` a real slide at the encoder's magnification, then
`ips embed` it with each encoder on this machine; bytes per patch of the feature store and patches per
second (wall and CPU) of the embedding loop alone (the encoder is built before the clock starts).

    IPS_TEST_DATA=../shared/data python benchmarks/embed.py --encoders vit_small_patch16_224 uni \
        --threads 1 --chunk-size 32

Weights are random (the speed and the bytes do not depend on them). Prints a markdown table.

Results page row: docs/BENCHMARKS.md, "Foundation encoders".
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from ips.cli.main import main as ips_main
from ips.data.store import open_store
from ips.infer.embed import embed_store
from ips.model.encoders import build_encoder


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slide", default=None, help="source slide (default IPS_TEST_DATA/cmu_small_region.svs)")
    p.add_argument("--encoders", nargs="+", default=["vit_small_patch16_224", "uni"])
    p.add_argument("--prep-encoder", default="uni", help="the grid: this foundation encoder's mpp and size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=32)
    args = p.parse_args()
    slide = args.slide or str(
        Path(os.environ.get("IPS_TEST_DATA", "../shared/data")) / "cmu_small_region.svs"
    )
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stores"
        prep = ["prep", slide, "--out", str(out), "--encoder", args.prep_encoder, "--store-from", "grid"]
        if ips_main([*prep, "--quiet", "--no-thumbnail", "--threads", str(args.threads)]) != 0:
            raise SystemExit("prep failed")
        store = next(out.glob("*.zarr"))
        grid = open_store(store).grid()
        print(
            f"slide {Path(slide).name}: {grid.n_patches} patches of {grid.patch_size[0]} px, threads {args.threads}"
        )
        print(
            "| encoder | params | dim | patches/s (wall) | CPU s/patch | store bytes/patch | fp16 raw bytes/patch |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name in args.encoders:
            torch.manual_seed(0)
            enc = build_encoder(
                name, in_chans=3, spatial_dims=2, patch_size=grid.patch_size[0], pretrained=False
            )
            wall, cpu = time.perf_counter(), time.process_time()
            info = embed_store(
                store, enc, name=name.replace("/", "_"), chunk_size=args.chunk_size, read_threads=2
            )
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            n = grid.n_patches
            stored = du(store / "features" / info.name)
            params = sum(q.numel() for q in enc.parameters()) / 1e6
            print(
                f"| {name} | {params:.0f} M | {info.dim} | {n / wall:.2f} | {cpu / n:.3f} | {stored / n:.0f} | "
                f"{2 * info.dim} |"
            )


if __name__ == "__main__":
    main()
