"""A real brain with one small planted lesion (family e of the learnability matrix).

Every volume is the MNI152 T1 template (the ICBM 2009 average brain that nilearn bundles: no download),
skull-stripped, at `resolution` mm, made to differ the way scans of one cohort differ:

- position: shifted by up to 4 voxels along each axis;
- intensity: a gain (x0.8-1.2) and a gamma (0.8-1.25);
- a bias field: a smooth multiplicative field of +-15-25% (the coil inhomogeneity of MR);
- noise: Rician-like (the magnitude of complex Gaussian noise), sd 2-4% of the white-matter intensity.

A positive volume holds one lesion: a soft-edged ellipsoid of semi-axes `lesion_radius` mm (default
10-14 mm), hypointense on T1 (40-60% of the tissue's intensity, like a chronic MS plaque or a lacune),
inside the white matter. Everything else that is dark in the white matter, the ventricles above all, is
anatomy: the unusual structures a model must learn to ignore. Needs nilearn (`pip install nilearn`).

Truth: `ips_truth/lesion` = share of each patch inside the ellipsoid.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from ips.synthetic._family import FamilyItem, write_family_dataset
from ips.synthetic.lesions import _smooth_field

MAX_SHIFT = 4  # voxels


@lru_cache(maxsize=2)
def mni_template(resolution: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The MNI152 T1 template `(X, Y, Z)` float32 in [0, 1] and its white-matter mask (bool), from nilearn."""
    try:
        from nilearn import datasets
    except ImportError:
        raise ImportError("the brain family needs nilearn: pip install nilearn") from None
    t1 = np.clip(np.asarray(datasets.load_mni152_template(resolution=resolution).get_fdata()), 0, 1)
    wm = np.asarray(datasets.load_mni152_wm_mask(resolution=resolution).get_fdata()) > 0.5
    return t1.astype(np.float32), wm


def _kept_cells(brain: np.ndarray, patch_size: int, margin: int) -> np.ndarray:
    """Bool mask of the grid cells (stride `patch_size`, wholly inside the volume `margin` voxels in) that
    are at least 60% brain: where a lesion is seen by the prep's grid whatever the shift."""
    p = patch_size
    cells = tuple((s - 2 * margin) // p for s in brain.shape)
    out = np.zeros(brain.shape, bool)
    for idx in np.ndindex(*cells):
        sl = tuple(slice(margin + i * p, margin + (i + 1) * p) for i in idx)
        if brain[sl].mean() >= 0.6:
            out[sl] = True
    return out


def render_brain(
    rng: np.random.Generator,
    *,
    positive: bool,
    resolution: int = 2,
    patch_size: int = 16,
    lesion_radius: tuple[float, float] = (10.0, 14.0),
) -> FamilyItem:
    """One `(1, X, Y, Z)` uint8 volume (background 0) of the template varied as the module says. The lesion
    lies in the grid cells of `patch_size` that the prep keeps (mostly brain), so that patches show it."""
    t1, wm = mni_template(resolution)
    shape = t1.shape
    lesion = np.zeros(shape, bool)
    vol = t1.copy()
    if positive:
        semi = rng.uniform(*lesion_radius, 3) / resolution
        r = int(np.ceil(semi.max())) + 1
        # centre deep enough in the white matter that most of the ellipsoid lies in it
        inner = ndimage.binary_erosion(wm, iterations=max(1, int(semi.min())))
        inner &= ndimage.binary_erosion(_kept_cells(t1 > 0.05, patch_size, MAX_SHIFT), iterations=r)
        centre = np.argwhere(inner)[rng.integers(int(inner.sum()))]
        grids = np.meshgrid(*[np.arange(s) - c for s, c in zip(shape, centre)], indexing="ij")
        rho2 = sum((g / a) ** 2 for g, a in zip(grids, semi))
        soft = np.clip((1.0 - rho2) * 2.0, 0.0, 1.0).astype(np.float32)  # flat core, soft rim
        lesion = rho2 <= 1.0
        vol = vol * (1.0 - soft * (1.0 - rng.uniform(0.4, 0.6)))
    brain = t1 > 0.05
    vol = vol ** rng.uniform(0.8, 1.25) * rng.uniform(0.8, 1.2)
    vol *= np.exp(rng.uniform(0.15, 0.25) * _smooth_field(rng, shape, 2))
    sd = rng.uniform(0.02, 0.04) * float(np.median(t1[wm]))
    noisy = np.hypot(vol + sd * rng.standard_normal(shape), sd * rng.standard_normal(shape))
    vol = np.where(brain, noisy, 0.0)
    shift = tuple(int(s) for s in rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, 3))
    vol, lesion = (ndimage.shift(a, shift, order=0, mode="constant", cval=0) for a in (vol, lesion))
    image = np.clip(vol * 200.0, 0, 255).round().astype(np.uint8)[None]
    return FamilyItem(
        image, label=int(positive), masks={"lesion": lesion.astype(bool)}, attrs={"shift": shift}
    )


def make_brain_lesions(
    out_dir: str | Path, n_slides: int, *, seed: int = 0, resolution: int = 2, patch_size: int = 16
) -> Path:
    """Family e: MNI152 brains at `resolution` mm (2: 99 x 117 x 95 voxels), half with one small lesion,
    as stores of `patch_size` voxels. Returns the manifest path."""

    def render(rng: np.random.Generator, label: int, split: str) -> FamilyItem:
        return render_brain(rng, positive=bool(label), resolution=resolution, patch_size=patch_size)

    return write_family_dataset(
        out_dir,
        family="brain",
        n_slides=n_slides,
        seed=seed,
        render=render,
        patch_size=patch_size,
        spacing=(float(resolution),) * 3,
        params={"resolution": resolution},
    )
