"""Handwritten marks in tissue: objects larger than a patch, sparse objects, and a count task.

Each slide is H&E-like tissue everywhere (blotchy eosin stroma, small hematoxylin nuclei, per-slide stain
strength, as `ips.synthetic.small_objects`), with real handwritten digits (MNIST) painted into it as dark
ink marks about `mark_size` px tall, all in one ink per slide. The target is a mark of digit `target_digit`; the
distractors are marks of the other digits: similar strokes, the same ink, the same size. The task is
binary:

- `make_split_marks` (family b): one target on each positive slide, 48-px marks at 32-px patches, so no
  patch shows a mark whole; 4-6 distractors per slide.
- `make_sparse_marks` (family c): the same at 768 px (576 patches), the target's box at most ~0.4% of
  the slide and its ink under 0.2%, 4-6 distractors.
- `make_count_marks` (family f): positive only with 2 or more targets; negatives hold
  0 or 1 target (half each), so one target alone does not make a slide positive.

Digits are drawn from disjoint pools per split (train / val / test slides never share a digit image).
Truth: `ips_truth/lesion` = share of each patch inside a target mark's ink (dilated by 2 px), and
`ips_truth/distractor` the same for the other marks; attributes `{"label", "targets", "digits"}`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from ips.synthetic._family import FamilyItem, place_boxes, write_family_dataset
from ips.synthetic._store import GridSpec
from ips.synthetic.lesions import EOSIN, HEMATOXYLIN, _smooth_field, _sprinkle
from ips.synthetic.megapixel_mnist import load_mnist_csv, split_digit_pools

INK = np.array([0.75, 0.70, 0.45], dtype=np.float32)  # a blue-black marker pen, optical density per RGB


def tissue_od(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """H&E-like tissue everywhere as optical density `(H, W, 3)` float32: eosin stroma and small nuclei."""
    h_scale, e_scale = rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)
    fine = rng.standard_normal((h, w)).astype(np.float32)
    eosin = e_scale * (0.38 + 0.08 * _smooth_field(rng, (h, w), 16) + 0.03 * fine)
    nuclei = np.zeros((h, w), dtype=np.float32)
    _sprinkle(rng, nuclei, np.ones((h, w), bool), 0.004 * rng.uniform(0.6, 1.4), (1.5, 3.0), (0.7, 1.1))
    hema = h_scale * (0.06 + nuclei * (1.0 + 0.12 * fine))
    od = hema[..., None] * HEMATOXYLIN + np.maximum(eosin, 0)[..., None] * EOSIN
    return od + 0.025 + 0.006 * rng.standard_normal((h, w, 1)).astype(np.float32)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Optical density `(H, W, 3)` -> RGB `(3, H, W)` uint8."""
    rgb = np.clip(255.0 * np.exp(-np.maximum(od, 0)), 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def scale_digit(img: np.ndarray, size: int) -> np.ndarray:
    """A 28x28 uint8 digit -> `(size, size)` float32 ink in [0, 1] (bilinear)."""
    out = ndimage.zoom(img.astype(np.float32) / 255.0, size / img.shape[0], order=1)
    return np.clip(out[:size, :size], 0.0, 1.0)


class DigitBank:
    """MNIST digits split into disjoint train/val/test pools; draws a digit of a class, or not of it."""

    def __init__(self, digits: str | Path, seed: int = 0) -> None:
        self.images, self.labels = load_mnist_csv(digits)
        self.pools = split_digit_pools(self.labels, (0.6, 0.2, 0.2), seed)

    def draw(self, rng: np.random.Generator, split: str, digit: int, *, other: bool = False) -> np.ndarray:
        pool = self.pools[split]
        pool = pool[(self.labels[pool] != digit) if other else (self.labels[pool] == digit)]
        return self.images[int(pool[rng.integers(len(pool))])]


def render_marks_slide(
    rng: np.random.Generator,
    bank: DigitBank,
    split: str,
    *,
    size: int,
    mark_size: int,
    n_targets: int,
    n_distractors: tuple[int, int],
    target_digit: int,
) -> FamilyItem:
    """One `(3, size, size)` slide with `n_targets` target marks and 4-6 (`n_distractors`) others."""
    n_dis = int(rng.integers(n_distractors[0], n_distractors[1] + 1))
    # an MNIST digit's ink spans the middle 20 of its 28 px: the box is 1.4 x the mark
    sizes = (1.4 * mark_size * rng.uniform(0.9, 1.1, n_targets + n_dis)).round().astype(int)
    corners = place_boxes(rng, (size, size), sizes.tolist(), gap=0)
    od = tissue_od(rng, size, size)
    ink_od = INK * rng.uniform(0.9, 1.1, 3).astype(np.float32) * rng.uniform(1.2, 1.8)
    target = np.zeros((size, size), bool)
    distractor = np.zeros((size, size), bool)
    digits = []
    for j, ((r, c), s) in enumerate(zip(corners, sizes)):
        is_target = j < n_targets
        img = bank.draw(rng, split, target_digit, other=not is_target)
        ink = scale_digit(img, int(s))
        od[r : r + s, c : c + s] += ink[..., None] * ink_od
        where = target if is_target else distractor
        where[r : r + s, c : c + s] |= ndimage.binary_dilation(ink > 0.3, iterations=2)
        digits.append({"box": [int(r), int(c), int(s)], "target": is_target})
    return FamilyItem(
        od_to_rgb(od),
        label=-1,  # the caller sets the label of its task
        masks={"lesion": target, "distractor": distractor},
        attrs={"targets": n_targets, "digits": digits},
    )


def _marks_dataset(
    out_dir: str | Path,
    *,
    family: str,
    n_slides: int,
    seed: int,
    digits: str | Path,
    size: int,
    patch_size: int,
    mark_size: int,
    count: bool = False,
    target_digit: int = 7,
    extra_grids: Sequence[GridSpec] = (),
) -> Path:
    bank = DigitBank(digits, seed)

    def render(rng: np.random.Generator, label: int, split: str) -> FamilyItem:
        # count task: positives 2 or 3 targets, negatives 0 or 1; otherwise 1 or 0
        n_targets = (int(rng.integers(2, 4)) if label else int(rng.integers(0, 2))) if count else label
        item = render_marks_slide(
            rng,
            bank,
            split,
            size=size,
            mark_size=mark_size,
            n_targets=n_targets,
            n_distractors=(4, 6),
            target_digit=target_digit,
        )
        return FamilyItem(item.image, label, item.masks, item.attrs)

    params = {"size": size, "mark_size": mark_size, "count": count, "target_digit": target_digit}
    return write_family_dataset(
        out_dir,
        family=family,
        n_slides=n_slides,
        seed=seed,
        render=render,
        patch_size=patch_size,
        spacing=(0.5, 0.5),
        params=params,
        extra_grids=extra_grids,
    )


def _family_maker(family: str, *, size: int, mark_size: int, count: bool, doc: str) -> Callable[..., Path]:
    """The public generator of one marks family: the same arguments for b, c and f, their own defaults."""

    def make(
        out_dir: str | Path,
        n_slides: int,
        *,
        digits: str | Path,
        seed: int = 0,
        size: int = size,
        patch_size: int = 32,
        mark_size: int = mark_size,
        target_digit: int = 7,
        extra_grids: Sequence[GridSpec] = (),
    ) -> Path:
        return _marks_dataset(
            out_dir,
            family=family,
            n_slides=n_slides,
            seed=seed,
            digits=digits,
            size=size,
            patch_size=patch_size,
            mark_size=mark_size,
            count=count,
            target_digit=target_digit,
            extra_grids=extra_grids,
        )

    make.__doc__ = (
        doc + " `digits`: an MNIST CSV (`ips.synthetic.load_mnist_csv`). Returns the manifest path."
    )
    return make


make_split_marks = _family_maker(
    "marks",
    size=512,
    mark_size=48,
    count=False,
    doc="Family b: a target mark larger than a patch (48 px at 32-px patches) among similar marks.",
)
make_sparse_marks = _family_maker(
    "sparse",
    size=768,
    mark_size=48,
    count=False,
    doc="Family c: the target mark on a 768-px slide (576 patches of 32 px): its box ~0.4% of the slide, "
    "its ink < 0.2%, among 4-6 similar marks.",
)
make_count_marks = _family_maker(
    "count",
    size=512,
    mark_size=40,
    count=True,
    doc="Family f: positive only with 2 or 3 target marks; negatives hold 0 or 1.",
)
