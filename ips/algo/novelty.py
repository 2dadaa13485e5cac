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
"""

from __future__ import annotations

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
