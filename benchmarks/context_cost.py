"""Host CPU of a selection pass with and without context reads (`data.context`): reads and encoder.

    python benchmarks/context_cost.py STORES... [--factor 3] [--encoder ips_cnn_small] [--repeat 3]

Each store's whole default grid is read in index order, 64 cells per call, by one read thread: the
patches alone (`ZarrPatchSource.read`) and patches with their context views (`ContextSource.read`);
then the encoder (one torch thread, no gradient) on the patches alone and on both views
(`IPSModel.encode` with `views=2`). Figures: process CPU time per store pass, averaged over stores and
repeats (the machine may be shared: CPU time is the steadier figure).

Results page row: docs/BENCHMARKS.md, "Learnability matrix (ips bench learn)" (context reads, cost).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ips.config import ModelConfig
from ips.data.context import ContextSource
from ips.data.zarr_source import ZarrPatchSource
from ips.model.ips_model import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+")
    parser.add_argument("--factor", type=int, default=3)
    parser.add_argument("--encoder", default="ips_cnn_small")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    first = ZarrPatchSource(args.stores[0], read_threads=1)
    channels, patch = first.patch_shape[0], first.patch_shape[1]
    cfg = ModelConfig(
        encoder=args.encoder, in_chans=channels, spatial_dims=first.spatial_dims, patch_size=patch, d_model=64
    )
    model = build_model(cfg, views=2).eval()
    totals = dict.fromkeys(["read", "read_with_context", "encoder", "encoder_two_views"], 0.0)

    def cpu(key: str, fn, *args) -> None:
        start = time.process_time()
        fn(*args)
        totals[key] += time.process_time() - start

    def encode_one_view(both: torch.Tensor) -> torch.Tensor:
        return model.encoder(model.normalize(both[:, :channels].contiguous()))

    for _ in range(args.repeat):
        for store in args.stores:
            base = ZarrPatchSource(store, read_threads=1)
            context = ContextSource(base, args.factor)
            for start in range(0, len(base), 64):
                cells = np.arange(start, min(len(base), start + 64))
                cpu("read", base.read, cells)
                cpu("read_with_context", context.read, cells)
                both = context.read(cells)
                with torch.no_grad():
                    cpu("encoder", encode_one_view, both)
                    cpu("encoder_two_views", model.encode, both)
    passes = args.repeat * len(args.stores)
    print(
        " | ".join(f"{k} {v / passes * 1e3:.1f} ms" for k, v in totals.items()), "(host CPU per store pass)"
    )


if __name__ == "__main__":
    main()
