"""Patch augmentation on the device, for training only: flips, 90-degree rotations, light colour jitter.

Works on batched float patches `(n, C, H, W)` or `(n, C, D, H, W)` with values in [0, 1], each patch
drawing its own transform. Random numbers come from the given `torch.Generator` (drawn on the
generator's device, then moved), so a seeded generator gives the same augmentation on CPU and CUDA.

- flips along every spatial axis (any patch shape);
- 90-degree rotations in each spatial plane whose two sides are equal (2D: square patches; 3D: only the
  planes where the patch is cubic);
- shift: each patch moved by a random integer offset in [-shift, shift] pixels along every spatial axis,
  the uncovered border filled by reflection (no new colour, no black frame on tissue);
- colour, `color_jitter` = strength s (0 = off): for RGB, HED stain jitter (Tellez et al. 2018: each
  stain's optical density scaled by U(1-s, 1+s) and shifted by U(-s, s)) and saturation U(1-s, 1+s);
  for any C, brightness +U(-s, s) and contrast U(1-s, 1+s).

Items of several views (`views` V > 1: a cell's patch and its context, channels stacked, `(n, V * C,
*spatial)`) get one transform per item: the views are centred on the same point, so a flip or turn of
the stack turns both alike, and the colour change of the patch is the colour change of its context.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch

from ips.config import DataConfig

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as in skimage.color.rgb2hed
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


def _uniform(
    n: int, lo: float, hi: float, generator: torch.Generator | None, like: torch.Tensor, *shape: int
) -> torch.Tensor:
    """U(lo, hi) of shape `(n, *shape)` drawn on the generator's device, returned on `like`'s device."""
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand((n, *shape), generator=generator, device=device)
    return (lo + (hi - lo) * u).to(device=like.device, dtype=torch.float32)


def _bernoulli(n: int, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """n fair coin flips, bool `(n,)` on `like`'s device."""
    return _uniform(n, 0.0, 1.0, generator, like) < 0.5


def flip_rotate(
    x: torch.Tensor, generator: torch.Generator | None = None, *, flips: bool = True, rot90: bool = True
) -> torch.Tensor:
    """Per-patch random flips and 90-degree rotations of `x` `(n, C, *spatial)`; returns a new tensor."""
    n, dims = x.shape[0], x.ndim - 2
    view = (n,) + (1,) * (x.ndim - 1)
    if flips:
        for ax in range(2, x.ndim):
            x = torch.where(_bernoulli(n, generator, x).view(view), x.flip(ax), x)
    planes = [(a, b) for a, b in combinations(range(2, 2 + dims), 2) if x.shape[a] == x.shape[b]]
    if rot90 and planes:
        device = generator.device if generator is not None else torch.device("cpu")
        if not flips:
            x = x.clone()  # rotations below write into x; never into the caller's tensor
        for a, b in planes:
            k = torch.randint(0, 4, (n,), generator=generator, device=device).to(x.device)
            for turns in (1, 2, 3):
                sel = torch.nonzero(k == turns).squeeze(1)
                if sel.numel():
                    x[sel] = torch.rot90(x[sel], turns, dims=(a, b))
    return x


def shift_patches(x: torch.Tensor, shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-patch random translation of `x` `(n, C, *spatial)` by up to `shift` pixels per axis.

    Output pixel `p` of a patch moved by offset `o` is input pixel `p - o`, reflected at the border
    (`torch.nn.functional.pad` mode 'reflect'), so `shift` must be smaller than every side.
    """
    n, spatial = x.shape[0], x.shape[2:]
    if shift <= 0 or n == 0:
        return x
    if shift >= min(spatial):
        raise ValueError(f"data.shift: {shift} pixels must be smaller than the patch side {min(spatial)}")
    device = generator.device if generator is not None else torch.device("cpu")
    padded = torch.nn.functional.pad(x, (shift,) * (2 * len(spatial)), mode="reflect")
    for axis, side in enumerate(spatial, start=2):
        # start of each patch's window in the padded axis: shift - offset, offset ~ U{-shift..shift}
        start = torch.randint(0, 2 * shift + 1, (n,), generator=generator, device=device).to(x.device)
        index = start.view(n, 1) + torch.arange(side, device=x.device)
        view = [n] + [1] * (padded.ndim - 1)
        view[axis] = side
        index = index.view(view).expand(*padded.shape[:axis], side, *padded.shape[axis + 1 :])
        padded = torch.gather(padded, axis, index)
    return padded


def hed_jitter(x: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-patch stain jitter of RGB `x` `(n, 3, *spatial)` in [0, 1], in HED optical-density space."""
    n = x.shape[0]
    dtype = x.dtype
    rgb = x.float().clamp_min(1e-6)
    m_in, m_out = HED_FROM_RGB.to(x.device), RGB_FROM_HED.to(x.device)
    # optical density -ln(I) (natural units, as skimage's rgb2hed when Tellez et al. used it), then stain
    # concentrations: (n, 3, *spatial), a channel-wise matmul
    stains = torch.einsum("nc...,cs->ns...", -torch.log(rgb), m_in)
    view = (n, 3) + (1,) * (x.ndim - 2)
    alpha = _uniform(n, 1 - strength, 1 + strength, generator, x, 3).view(view)
    beta = _uniform(n, -strength, strength, generator, x, 3).view(view)
    stains = stains * alpha + beta
    out = torch.exp(-torch.einsum("ns...,sc->nc...", stains, m_out))
    return out.clamp(0, 1).to(dtype)


def color_jitter(x: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-patch brightness and contrast (any C) and saturation (C == 3) of `x` in [0, 1]."""
    n = x.shape[0]
    view = (n,) + (1,) * (x.ndim - 1)
    out = x.float()
    brightness = _uniform(n, -strength, strength, generator, x).view(view)
    contrast = _uniform(n, 1 - strength, 1 + strength, generator, x).view(view)
    out = out + brightness
    mean = out.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    out = (out - mean) * contrast + mean
    if x.shape[1] == 3:
        saturation = _uniform(n, 1 - strength, 1 + strength, generator, x).view(view)
        gray = 0.299 * out[:, 0:1] + 0.587 * out[:, 1:2] + 0.114 * out[:, 2:3]
        out = (out - gray) * saturation + gray
    return out.clamp(0, 1).to(x.dtype)


@dataclass(frozen=True)
class PatchAugment:
    """Training-time patch augmentation; `enabled=False` (or all parts off) is the identity.

    Call as `augment(x, generator)` with `x` float `(n, C, *spatial)` in [0, 1] on any device.
    """

    enabled: bool = True
    flips: bool = True
    rot90: bool = True
    color_jitter: float = 0.0
    shift: int = 0
    views: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.color_jitter <= 0.5:
            raise ValueError(f"color_jitter must be in [0, 0.5], got {self.color_jitter}")
        if self.shift < 0:
            raise ValueError(f"shift must be >= 0 pixels, got {self.shift}")
        if self.views < 1:
            raise ValueError(f"views must be >= 1, got {self.views}")

    @classmethod
    def from_config(cls, data: DataConfig) -> PatchAugment:
        return cls(
            enabled=data.augment,
            flips=data.orientation,
            rot90=data.orientation,
            color_jitter=data.color_jitter,
            shift=data.shift,
            views=data.views,
        )

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not x.is_floating_point():
            raise TypeError(
                f"augment float patches in [0, 1]; got dtype {x.dtype} (convert on the device first)"
            )
        if x.ndim not in (4, 5):
            raise ValueError(f"patches must be (n, C, H, W) or (n, C, D, H, W), got shape {tuple(x.shape)}")
        if not self.enabled or x.shape[0] == 0:
            return x
        if self.flips or self.rot90:
            x = flip_rotate(x, generator, flips=self.flips, rot90=self.rot90)
        if self.shift > 0:
            x = shift_patches(x, self.shift, generator)
        if self.color_jitter > 0:
            x = self._colour(x, generator)
        return x

    def _colour(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Colour jitter of `(n, V * C, *S)`, drawn once per item: the views as one more spatial axis."""
        if self.views == 1:
            x = hed_jitter(x, self.color_jitter, generator) if x.shape[1] == 3 else x
            return color_jitter(x, self.color_jitter, generator)
        n, vc, *spatial = x.shape
        stacked = x.reshape(n, self.views, vc // self.views, *spatial).transpose(1, 2)  # (n, C, V, *S)
        if stacked.shape[1] == 3:
            stacked = hed_jitter(stacked, self.color_jitter, generator)
        stacked = color_jitter(stacked, self.color_jitter, generator)
        return stacked.transpose(1, 2).reshape(x.shape)
