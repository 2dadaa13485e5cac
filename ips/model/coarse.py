"""The cascade's coarse scorer: a small CNN that scores a patch from a coarse view of its pixels.

It stands in for the full model's selection score at a fraction of its cost: trained to rank patches
as the full model's attention does (`ips.training.distill`), it picks the candidates that the full model
then scores exactly (`ips.algo.cascade`). It lives on the model as `model.coarse_scorer`, so it is saved
and loaded with the model's weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ips.model.ips_model import IPSModel, normalize_pixels


class CoarseScorer(nn.Module):
    """Coarse patches `(n, C, *S)` (uint8 or float in [0, 1]) -> scores `(n,)` float.

    Three 3x3(x3) convolutions (the last two with stride 2), global average pooling, a two-layer MLP;
    no normalisation layers, so training and eval mode compute the same function. 2D and 3D alike.
    `mean`, `std` `(C,)`: the pixel normalisation of the model it serves.
    """

    def __init__(
        self,
        *,
        in_chans: int,
        spatial_dims: int,
        width: int = 16,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
        w2 = 2 * width
        self.net = nn.Sequential(
            conv(in_chans, width, 3, padding=1),
            nn.GELU(),
            conv(width, w2, 3, stride=2, padding=1),
            nn.GELU(),
            conv(w2, w2, 3, stride=2, padding=1),
            nn.GELU(),
            pool,
            nn.Flatten(),
            nn.Linear(w2, w2),
            nn.GELU(),
            nn.Linear(w2, 1),
        )
        shape = (1, in_chans) + (1,) * spatial_dims
        mean = torch.full((in_chans,), 0.5) if mean is None else mean.reshape(-1)
        std = torch.full((in_chans,), 0.25) if std is None else std.reshape(-1)
        self.register_buffer("pixel_mean", mean.detach().clone().reshape(shape), persistent=False)
        self.register_buffer("pixel_std", std.detach().clone().reshape(shape), persistent=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """`(n, C, *S)` -> `(n,)`."""
        return self.net(normalize_pixels(patches, self.pixel_mean, self.pixel_std)).squeeze(1)


def attach_coarse_scorer(model: IPSModel, *, width: int = 16) -> CoarseScorer:
    """Give a pixel model its coarse scorer (`model.coarse_scorer`, a fresh one; seeded by the caller),
    on the model's device. ValueError for a model of precomputed features (no pixels to look at)."""
    if not model.pixel_input:
        raise ValueError("the cascade needs pixels: a model of precomputed features has no coarse view")
    mean, std = model.pixel_mean, model.pixel_std
    scorer = CoarseScorer(
        in_chans=mean.shape[1], spatial_dims=model.spatial_dims, width=width, mean=mean, std=std
    ).to(mean.device)
    model.coarse_scorer = scorer
    return scorer
