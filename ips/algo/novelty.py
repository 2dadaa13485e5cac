"""How unusual each patch looks within its slide: where training exploration looks for small objects.

With a fresh or self-supervised encoder, attention has not yet learnt what matters, and a small object
(a few patches among hundreds or thousands) almost never reaches the top M, nor the random explore slots
(docs/BENCHMARKS.md: 0-7% of positive training slides per epoch; the runs that never see it stay at
chance). Such an object is *unusual*: it looks unlike most of its slide. The novelty score measures that
without labels, from the content embeddings the selection pass computes anyway:

    novelty(x) = mean over d of ((e_d(x) - mu_d) / sigma_d) ** 2

`mu`, `sigma` `(D,)`: mean and standard deviation of a reference sample of the slide's patches, drawn at
random before the pass. The score then depends on each patch alone, so the streaming top-P equals the
global top-P over the slide (as for the selection itself), whatever the chunk size and order.

Novelty within a slide finds every unusual structure, relevant or not (pen marks, folds, ventricles).
*Cohort* novelty asks instead how unlike anything in the *negative* slides a patch is:

    cohort_novelty(x) = min over b in bank of mean over d of ((e_d(x) - e_d(b)) / sigma_d) ** 2

`bank` `(K, D)`: content embeddings of patches of negative training slides (the reference samples that the
selection pass embeds anyway), a bounded FIFO (`CohortBank`), so that it follows the encoder as it trains;
`sigma` the bank's per-dimension spread. What negatives also hold (anatomy, distractors) scores low; what
only positives hold scores high. Per patch alone again, for a fixed bank: streaming top-P is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

REFERENCE_PATCHES = 32  # one extra chunk's worth of encoder work per slide and epoch (training only)


@dataclass(frozen=True)
class NoveltyReference:
    """Per-dimension `mean` and `scale` `(D,)` of a slide's typical content embedding."""

    mean: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def from_sample(cls, content: torch.Tensor) -> NoveltyReference:
        """From content embeddings `(n, D)` of randomly drawn patches. Dimensions that barely vary in the
        sample get a floor of a tenth of the mean scale, so that one of them cannot dominate the score."""
        content = content.float()
        std = content.std(dim=0, unbiased=False) if len(content) > 1 else torch.zeros(content.shape[1])
        floor = 0.1 * std.mean() + 1e-12
        return cls(content.mean(dim=0), std.clamp_min(floor))

    def scores(self, content: torch.Tensor) -> torch.Tensor:
        """Novelty `(n,)` of content embeddings `(n, D)`; a non-finite embedding scores -inf (never chosen)."""
        s = (
            ((content.float() - self.mean.to(content.device)) / self.scale.to(content.device))
            .pow(2)
            .mean(dim=1)
        )
        return torch.where(torch.isfinite(s), s, torch.full_like(s, float("-inf")))


def reference_indices(n: int, generator: np.random.Generator, size: int = REFERENCE_PATCHES) -> np.ndarray:
    """Sorted indices of `min(size, n)` patches drawn without replacement: the reference sample."""
    return np.sort(generator.choice(n, size=min(size, n), replace=False))


def _spread(content: torch.Tensor) -> torch.Tensor:
    """Per-dimension standard deviation `(D,)` of `(n, D)`, floored at a tenth of its mean."""
    std = content.std(dim=0, unbiased=False) if len(content) > 1 else torch.zeros(content.shape[1])
    return std.clamp_min(0.1 * std.mean() + 1e-12)


@dataclass(frozen=True)
class CohortReference:
    """Novelty against a bank of negative-slide embeddings: `bank` `(K, D)`, `scale` `(D,)`."""

    bank: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def from_bank(cls, bank: torch.Tensor) -> CohortReference:
        bank = bank.float()
        return cls(bank, _spread(bank))

    def scores(self, content: torch.Tensor) -> torch.Tensor:
        """Cohort novelty `(n,)` of content embeddings `(n, D)`: the mean squared standardised distance to
        the nearest bank embedding; a non-finite embedding scores -inf (never chosen)."""
        scale = self.scale.to(content.device)
        x = content.float() / scale  # (n, D)
        b = self.bank.to(content.device) / scale  # (K, D)
        d2 = torch.cdist(x, b).pow(2).min(dim=1).values / x.shape[1]  # (n,)
        return torch.where(torch.isfinite(d2), d2, torch.full_like(d2, float("-inf")))


COHORT_BANK = 1024  # negative-slide patch embeddings kept: 32 slides' reference samples
COHORT_MIN = 64  # below this many, novelty falls back to the slide's own reference


class CohortBank:
    """A bounded FIFO bank of content embeddings `(<= capacity, D)` of negative training slides' patches.

    `for_slide(negative)` gives the reference maker that the selection pass calls with the slide's reference
    sample `(n, D)`: it returns the cohort reference of the bank as it is (the slide's own reference while
    the bank holds fewer than `min_size`), then adds the sample to the bank when the slide is negative.
    """

    def __init__(self, capacity: int = COHORT_BANK, min_size: int = COHORT_MIN) -> None:
        if capacity < 1 or not 1 <= min_size <= capacity:
            raise ValueError(f"need capacity >= min_size >= 1, got {capacity}, {min_size}")
        self.capacity, self.min_size = capacity, min_size
        self.bank: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.bank is None else len(self.bank)

    def add(self, content: torch.Tensor) -> None:
        """Append `(n, D)` rows (finite ones only), dropping the oldest beyond `capacity`."""
        content = content.detach().float().cpu()
        content = content[torch.isfinite(content).all(dim=1)]
        bank = content if self.bank is None else torch.cat([self.bank, content])
        self.bank = bank[-self.capacity :]

    def reference(self, sample: torch.Tensor) -> CohortReference | NoveltyReference:
        """The bank's reference, or the slide's own (`sample` `(n, D)`) while the bank is too small."""
        if self.bank is None or len(self.bank) < self.min_size:
            return NoveltyReference.from_sample(sample)
        return CohortReference.from_bank(self.bank)

    def for_slide(self, negative: bool) -> Callable[[torch.Tensor], CohortReference | NoveltyReference]:
        def make(sample: torch.Tensor) -> CohortReference | NoveltyReference:
            ref = self.reference(sample)
            if negative:
                self.add(sample)
            return ref

        return make
