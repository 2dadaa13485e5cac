"""Views for self-supervised pretraining, on float patches `(n, C, *S)` in [0, 1], per patch random.

All randomness comes from the given `torch.Generator` (drawn on the CPU), so a seeded run repeats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ips.data.augment import color_jitter, flip_rotate, hed_jitter


def _u(n: int, lo: float, hi: float, gen: torch.Generator, like: torch.Tensor, *shape: int) -> torch.Tensor:
    return (lo + (hi - lo) * torch.rand((n, *shape), generator=gen)).to(like.device, torch.float32)


def random_affine(
    x: torch.Tensor,
    gen: torch.Generator,
    *,
    scale: tuple[float, float],
    shear: float,
) -> torch.Tensor:
    """Random zoom-in crop (side share U(scale)), shift within the patch and shear up to `shear`:
    `(n, C, *S)` -> same shape (bilinear, reflected borders). 2D and 3D."""
    n, d = x.shape[0], x.ndim - 2
    s = _u(n, scale[0], scale[1], gen, x)  # (n,)
    theta = torch.zeros(n, d, d + 1, device=x.device)
    eye = torch.eye(d, device=x.device)
    off = _u(n, -shear, shear, gen, x, d, d) * (1 - eye)
    theta[:, :, :d] = s.view(n, 1, 1) * (eye + off)
    theta[:, :, d] = _u(n, -1, 1, gen, x, d) * (1 - s).view(n, 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_blur(
    x: torch.Tensor, gen: torch.Generator, *, p: float, sigma: tuple[float, float]
) -> torch.Tensor:
    """Gaussian blur of a random share `p` of the patches, sigma U(sigma) px, separable, 2D and 3D."""
    n, c, d = x.shape[0], x.shape[1], x.ndim - 2
    on = _u(n, 0, 1, gen, x) < p
    if not bool(on.any()):
        return x
    sig = _u(n, sigma[0], sigma[1], gen, x)
    r = 2
    t = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
    k = torch.exp(-(t.view(1, -1) ** 2) / (2 * sig.view(-1, 1) ** 2))
    k = k / k.sum(1, keepdim=True)  # (n, 2r+1)
    k = torch.where(on.view(-1, 1), k, (t == 0).float().expand_as(k))
    kern = k.repeat_interleave(c, 0)  # (n*C, 2r+1)
    y = x.reshape(1, n * c, *x.shape[2:])
    conv = F.conv2d if d == 2 else F.conv3d
    for axis in range(d):
        shape = [n * c, 1] + [1] * d
        shape[2 + axis] = 2 * r + 1
        pad = [0, 0] * d
        pad[2 * (d - 1 - axis)] = pad[2 * (d - 1 - axis) + 1] = r
        y = conv(F.pad(y, pad, mode="replicate"), kern.view(shape), groups=n * c)
    return y.reshape(x.shape)


def intensity_jitter(x: torch.Tensor, gen: torch.Generator, strength: float) -> torch.Tensor:
    """MR/CT-style: per patch intensity scale U(1 -+ 0.25s), shift U(-+0.1s), gamma exp(U(-+0.35s)), noise."""
    n = x.shape[0]
    view = (n,) + (1,) * (x.ndim - 1)
    scale = _u(n, 1 - 0.25 * strength, 1 + 0.25 * strength, gen, x).view(view)
    shift = _u(n, -0.1 * strength, 0.1 * strength, gen, x).view(view)
    gamma = torch.exp(_u(n, -0.35 * strength, 0.35 * strength, gen, x)).view(view)
    noise = 0.02 * strength * torch.randn(x.shape, generator=gen).to(x.device)
    return ((x.clamp(0, 1) ** gamma) * scale + shift + noise).clamp(0, 1)


@dataclass(frozen=True)
class ViewAugment:
    """One random view of each patch. `he`: RGB H&E (stain jitter, greyscale); else grey intensities.

    `orientation`: random flips and quarter turns (off for rotation prediction, whose label is the turn).
    """

    he: bool
    strength: float = 1.0
    orientation: bool = True

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        s = self.strength
        if s > 0:
            x = random_affine(x, gen, scale=(1 - 0.35 * min(s, 1.5), 1.0), shear=0.1 * s)
        if self.orientation:
            x = flip_rotate(x, gen)
        if s > 0:
            if self.he:
                x = hed_jitter(x, 0.15 * s, gen)
                x = color_jitter(x, min(0.5, 0.2 * s), gen)
                grey = _u(x.shape[0], 0, 1, gen, x) < 0.2 * min(s, 1.0)
                g = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
                x = torch.where(grey.view(-1, 1, *[1] * (x.ndim - 2)), g, x)
            else:
                x = intensity_jitter(x, gen, s)
            x = random_blur(x, gen, p=0.3 * min(s, 1.0), sigma=(0.3, 1.2))
        return x
