"""Patches drawn across stores for pretraining: a few at a time per store, read through `ZarrPatchSource`.

Host memory holds the grids' coordinates (O(N) scalars per store) and one or two batches of patches:
never a whole slide. Each epoch's draw depends on (seed, epoch) alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ips.data.sources import PatchSource


def content_score(x: torch.Tensor) -> torch.Tensor:
    """How much a patch shows: the standard deviation of its pixels, `(n, C, *S)` -> `(n,)` float32.

    A blank patch (background, an empty stretch of canvas) scores 0 however bright it is.
    """
    return x.reshape(len(x), -1).float().std(dim=1, unbiased=False)


class StorePatchSampler:
    """Batches `(batch_size, C, *S)` uint8 of patches drawn uniformly over all grid patches of `sources`.

    A batch is `batch_size // per_slide` groups of `per_slide` patches, each group from one store
    (chosen with probability proportional to its patch count) and read with one `read` call.
    `oversample` k > 1 draws k x as many patches the same way and keeps the `batch_size` with the most
    content (`content_score`): where most of the grid is blank (a sparse canvas, a slide's background
    kept by a permissive mask), the contrastive batch is not a batch of near-identical empty patches.
    """

    def __init__(
        self, sources: Sequence[PatchSource], *, batch_size: int, per_slide: int, oversample: int = 1
    ) -> None:
        if not sources:
            raise ValueError("no stores to pretrain on")
        self.sources = list(sources)
        self.sizes = np.asarray([len(s) for s in self.sources], dtype=np.int64)
        if self.sizes.sum() == 0:
            raise ValueError("the stores' grids have no patches")
        if oversample < 1:
            raise ValueError(f"oversample must be >= 1, got {oversample}")
        self.batch_size = batch_size
        self.per_slide = per_slide
        self.oversample = oversample

    def _draw(self, rng: np.random.Generator) -> list[tuple[int, np.ndarray]]:
        groups, left = [], self.batch_size * self.oversample
        p = self.sizes / self.sizes.sum()
        while left > 0:
            k = min(self.per_slide, left)
            s = int(rng.choice(len(self.sources), p=p))
            n = int(self.sizes[s])
            idx = np.sort(rng.choice(n, size=k, replace=n < k))
            groups.append((s, idx))
            left -= k
        return groups

    def _read(self, groups: list[tuple[int, np.ndarray]]) -> torch.Tensor:
        x = torch.cat([self.sources[s].read(idx) for s, idx in groups])
        if self.oversample == 1:
            return x
        # stable: among equal scores (all blank) the earlier draw wins, so a seeded run repeats
        keep = torch.sort(-content_score(x), stable=True).indices[: self.batch_size]
        return x[torch.sort(keep).values]

    def batches(self, n_batches: int, seed: int, epoch: int) -> Iterator[torch.Tensor]:
        """`n_batches` batches of epoch `epoch`; the next batch is read in a thread while one is used."""
        rng = np.random.default_rng([seed, 0x5054, epoch])
        draws = [self._draw(rng) for _ in range(n_batches)]
        if not draws:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="ips-pretrain-read") as pool:
            pending = pool.submit(self._read, draws[0])
            for i in range(n_batches):
                batch = pending.result()
                if i + 1 < n_batches:
                    pending = pool.submit(self._read, draws[i + 1])
                yield batch
