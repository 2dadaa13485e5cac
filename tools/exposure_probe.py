#!/usr/bin/env python
"""Run `ips train` and log, per epoch, how often the training selections show the object (diagnosis).

    python tools/exposure_probe.py [--min-share 0.25] [--oracle] -- train --config C --manifest M --out R ...

For stores that carry per-patch truth (`ips_truth/lesion`: the synthetic lesion, small-object and 3D
sets): after each epoch, of the positive training slides (truth > 0 somewhere), the share whose
attention top-M holds a patch with truth >= `--min-share`, the share after the explore slots, and the
mean number of such patches per slide. A run that stays at chance with these near 0 never saw the
object (docs/BENCHMARKS.md, "Third look"). `--oracle` (measurement only: it reads the truth) puts one
such patch into the selection of every positive slide, to tell "never saw it" from "saw it, did not learn".
Counts are taken where the loop adds its explore slots, so the run needs `selection.explore > 0`.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import zarr

import ips.training.loop as loop
from ips.algo.selection import guide_selection
from ips.cli.main import main as ips_main


class Exposure:
    """Counts per epoch; `wrap_*` replace the training loop's functions with counting versions."""

    def __init__(self, min_share: float, oracle: bool) -> None:
        self.min_share, self.oracle = min_share, oracle
        self.truth: dict[str, np.ndarray] = {}
        self.pending: list[str] = []  # store paths of the batch being selected, in order
        self.counts = {"slides": 0, "top_m": 0, "after": 0, "patches": 0}

    def truth_of(self, path: str) -> np.ndarray:
        if path not in self.truth:
            self.truth[path] = zarr.open_group(path, mode="r")["ips_truth/lesion"][...]
        return self.truth[path]

    def wrap_batch(self, original):
        def selected_batch(model, records, *args, **kwargs):
            self.pending = [r.path for r in records]
            return original(model, records, *args, **kwargs)

        return selected_batch

    def wrap_explore(self, original):
        def explore_selection(sel, src, **kwargs):
            truth = self.truth_of(self.pending.pop(0))
            out = original(sel, src, **kwargs)
            if truth.max() <= 0:
                return out
            hits = np.flatnonzero(truth >= self.min_share)
            if self.oracle and len(hits):
                out = guide_selection(
                    out, src, candidates=hits, fraction=1 / len(out.indices), generator=kwargs["generator"]
                )
            self.counts["slides"] += 1
            self.counts["top_m"] += bool(np.isin(sel.indices.numpy(), hits).any())
            shown = np.isin(out.indices.numpy(), hits)
            self.counts["after"] += bool(shown.any())
            self.counts["patches"] += int(shown.sum())
            return out

        return explore_selection

    def wrap_end_epoch(self, original):
        def end_epoch(row, *args, **kwargs):
            n = max(1, self.counts["slides"])
            print(
                f"exposure epoch {row['epoch']}: {self.counts['slides']} positive slides; object in top-M "
                f"{self.counts['top_m'] / n:.2f}, after explore {self.counts['after'] / n:.2f}, "
                f"object patches per slide {self.counts['patches'] / n:.2f}",
                file=sys.stderr,
                flush=True,
            )
            self.counts = dict.fromkeys(self.counts, 0)
            return original(row, *args, **kwargs)

        return end_epoch


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--min-share", type=float, default=0.25, help="truth share that counts (default 0.25)"
    )
    parser.add_argument(
        "--oracle", action="store_true", help="force one object patch into each positive slide"
    )
    args = parser.parse_args(own)
    if not rest or rest[0] != "train":
        parser.error("give the ips command after --, starting with 'train'")
    probe = Exposure(args.min_share, args.oracle)
    loop.selected_batch = probe.wrap_batch(loop.selected_batch)
    loop.explore_selection = probe.wrap_explore(loop.explore_selection)
    loop._end_epoch = probe.wrap_end_epoch(loop._end_epoch)
    return ips_main(rest)


if __name__ == "__main__":
    sys.exit(main())
