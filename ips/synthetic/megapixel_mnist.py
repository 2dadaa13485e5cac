"""Megapixel MNIST: five MNIST digits and digit-like noise on a large black canvas.

After Katharopoulos & Fleuret (ICML 2019) in the multi-task form of the IPS paper (Bergner et al., ICLR
2023; reference generator `data/megapixel_mnist/make_mnist.py` of github.com/benbergner/ips). Rules:

- canvas `(H, W)` uint8, background 0 (paper: 1500 x 1500);
- 5 digits: 3 of the majority class `m ~ U{0..9}` (3 different MNIST images of that class) and 2 of other
  classes. `distinct_others=True` (default) draws 2 *different* classes from the 9 others; `False` is the
  reference rule (each drawn independently from the pool's digits that are not `m`, so they may share a
  class). Either way `m` appears exactly 3 times;
- digit boxes (28 * `digit_scale` pixels, nearest-neighbour upscaling) at uniform integer top-left corners
  in `[0, H - s] x [0, W - s]`, redrawn until no two boxes overlap (reference: `|dr| < s and |dc| < s`
  is an overlap);
- noise: `n_noise` patterns (paper: 50 at 1500 x 1500; default scales that by canvas area), each a pair
  of 1-pixel straight strokes from a dataset-wide bank, drawn first at uniform positions; digits are
  drawn last and overwrite their whole box, so noise never touches a digit;
- labels: `majority` = m; `max` = largest of the 5 digits; `top` = digit of the box with the smallest
  row (ties: smallest column; the reference uses placement order); `multilabel` = the sorted set of
  classes present.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ips.config import TaskConfig
from ips.synthetic._store import GridSpec, write_manifest, write_store

DIGIT_SIZE = 28
PAPER_CANVAS = 1500
PAPER_N_NOISE = 50
N_CLASSES = 10
N_MAJORITY = 3
N_OTHERS = 2
TASK_NAMES = ("majority", "max", "top", "multilabel")
SPLITS = ("train", "val", "test")

Label = int | tuple[int, ...]


@dataclass(frozen=True)
class Placement:
    """One digit on the canvas: class, row in the MNIST array, top-left corner and box side (pixels)."""

    digit: int
    index: int
    row: int
    col: int
    size: int

    def to_dict(self) -> dict[str, int]:
        return {"digit": self.digit, "index": self.index, "row": self.row, "col": self.col, "size": self.size}


@dataclass(frozen=True)
class MegapixelSample:
    """One canvas `image (H, W)` uint8, its digit placements, noise `(K, 3)` (row, col, pattern), labels."""

    image: np.ndarray
    placements: tuple[Placement, ...]
    noise: np.ndarray
    labels: dict[str, Label] = field(default_factory=dict)


def load_mnist_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an MNIST CSV (784 pixel values 0-255, then the label; optionally gzipped).

    Returns `images (N, 28, 28)` uint8 and `labels (N,)` int64.
    """
    table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != DIGIT_SIZE * DIGIT_SIZE + 1:
        raise ValueError(f"{path}: expected {DIGIT_SIZE**2 + 1} columns per row, got {table.shape[1]}")
    images = table[:, :-1].reshape(-1, DIGIT_SIZE, DIGIT_SIZE).astype(np.uint8)
    return images, table[:, -1]


def split_digit_pools(
    labels: np.ndarray, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, np.ndarray]:
    """Split digit indices into disjoint train/val/test pools, per class (stratified).

    Each class's indices are shuffled with `seed` and cut at the cumulative `fractions`; a split with a
    positive fraction gets at least one digit of every class. Returns split -> sorted int64 indices.
    """
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"fractions must be 3 non-negative numbers (train, val, test), got {fractions}")
    frac = np.asarray(fractions, dtype=float) / float(sum(fractions))
    rng = np.random.default_rng([seed, 0x4D4E])  # pool shuffling has its own stream
    pools: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in range(N_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        need = int((frac > 0).sum())
        if len(idx) < need:
            raise ValueError(f"class {c} has {len(idx)} digits, need at least {need} for disjoint pools")
        cuts = np.round(np.cumsum(frac)[:-1] * len(idx)).astype(int)
        parts = np.split(idx, cuts)
        # rounding may leave a split with a positive fraction empty: take one digit from the largest
        for i, part in enumerate(parts):
            if frac[i] > 0 and len(part) == 0:
                big = int(np.argmax([len(p) for p in parts]))
                parts[i], parts[big] = parts[big][-1:], parts[big][:-1]
        for s, part in zip(SPLITS, parts):
            pools[s].append(part)
    return {s: np.sort(np.concatenate(p)).astype(np.int64) for s, p in pools.items()}


def default_n_noise(canvas: tuple[int, int]) -> int:
    """The paper's 50 noise patterns per 1500 x 1500, scaled by canvas area."""
    return int(round(PAPER_N_NOISE * canvas[0] * canvas[1] / PAPER_CANVAS**2))


def make_noise_bank(n: int, seed: int) -> np.ndarray:
    """`n` digit-like noise patterns `(n, 28, 28)` uint8: each the union of two straight strokes.

    A stroke starts at the box's top-left corner and runs at an angle in [0, 0.4 pi) from the row axis
    until it leaves the box (as in the reference); the second stroke is mirrored left-right with
    probability 1/2; pixel values are 0.8-1.0 of 255.
    """
    rng = np.random.default_rng([seed, 0x4E4F])
    bank = np.zeros((n, DIGIT_SIZE, DIGIT_SIZE), dtype=np.float64)
    t = np.linspace(0.0, 1.0, 2 * DIGIT_SIZE)
    last = DIGIT_SIZE - 0.51
    for i in range(n):
        for k, slope in enumerate(np.tan(rng.random(2) * np.pi * 0.4)):
            # run until the longer axis reaches the far border
            end_r = min(last, last / slope) if slope > 0 else last
            rows = np.round(t * end_r).astype(int)
            cols = np.round(t * end_r * slope).astype(int)
            if k == 1 and rng.random() < 0.5:
                cols = DIGIT_SIZE - 1 - cols
            bank[i, rows, cols] = 1.0
    bank *= rng.random(bank.shape) * 0.2 + 0.8
    return np.round(bank * 255).astype(np.uint8)


def labels_from_placements(placements: Sequence[Placement]) -> dict[str, Label]:
    """The four task labels from the placed digits (see the module docstring for the rules)."""
    digits = np.array([p.digit for p in placements])
    counts = np.bincount(digits, minlength=N_CLASSES)
    top = min(placements, key=lambda p: (p.row, p.col))
    return {
        "majority": int(np.argmax(counts)),
        "max": int(digits.max()),
        "top": top.digit,
        "multilabel": tuple(int(c) for c in np.flatnonzero(counts)),
    }


def _place_boxes(
    rng: np.random.Generator, n: int, size: int, canvas: tuple[int, int]
) -> list[tuple[int, int]]:
    """`n` non-overlapping `size`-square boxes: uniform top-left corners, each redrawn on overlap.

    A box that finds no free spot in 1000 draws (a jammed tight canvas) restarts the whole layout.
    """
    h, w = canvas
    if h < size or w < size:
        raise ValueError(f"canvas {canvas} is smaller than a digit box of {size} pixels")
    for _ in range(100):
        boxes: list[tuple[int, int]] = []
        for _ in range(n):
            for _ in range(1000):
                r, c = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
                if all(abs(r - r2) >= size or abs(c - c2) >= size for r2, c2 in boxes):
                    boxes.append((r, c))
                    break
            else:
                break
        if len(boxes) == n:
            return boxes
    raise ValueError(f"could not place {n} non-overlapping {size}-pixel digits on a {canvas} canvas")


def _upscale(img: np.ndarray, scale: int) -> np.ndarray:
    return img if scale == 1 else np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)


def warp_digit(img: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A new hand for a digit: a random affine warp of `img (28, 28)` uint8 about its centre.

    `strength` 1: rotation up to +-15 degrees, scale 0.85-1.15, shear up to +-0.25 rad; 0: `img` itself.
    Training canvases drawn from a few thousand digits reuse each digit in many canvases, and a model
    can learn those instances by heart (docs/BENCHMARKS.md); warped copies are new instances.
    """
    if strength <= 0:
        return img
    from skimage.transform import AffineTransform, warp

    rot, shear = np.deg2rad(15.0) * strength, 0.25 * strength
    centre = (np.array(img.shape[::-1]) - 1) / 2.0  # (x, y)
    affine = AffineTransform(
        rotation=rng.uniform(-rot, rot),
        scale=1.0 + rng.uniform(-0.15, 0.15) * strength,
        shear=rng.uniform(-shear, shear),
    )
    to_centre, back = AffineTransform(translation=-centre), AffineTransform(translation=centre)
    forward = to_centre + affine + back
    out = warp(img.astype(np.float32), forward.inverse, order=1, preserve_range=True, mode="constant", cval=0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def make_sample(
    images: np.ndarray,
    labels: np.ndarray,
    pool: np.ndarray,
    rng: np.random.Generator,
    *,
    canvas: tuple[int, int] = (PAPER_CANVAS, PAPER_CANVAS),
    noise_bank: np.ndarray | None = None,
    n_noise: int | None = None,
    digit_scale: int = 1,
    distinct_others: bool = True,
    warp: float = 0.0,
    warp_rng: np.random.Generator | None = None,
) -> MegapixelSample:
    """Draw one Megapixel MNIST canvas from the digits `images[pool]`.

    `images (N, 28, 28)` uint8, `labels (N,)`, `pool` indices of usable digits (every class present).
    `noise_bank (K, 28, 28)` (default: 50 patterns from seed 0); `n_noise` default scales 50 by area.
    `warp` > 0 draws each digit through `warp_digit` with `warp_rng` (its own stream: the canvas's digits,
    boxes, noise and labels are those of `warp` 0).
    """
    if warp > 0 and warp_rng is None:
        raise ValueError("warp > 0 needs a warp_rng")
    if digit_scale < 1:
        raise ValueError(f"digit_scale must be >= 1, got {digit_scale}")
    by_class = [pool[labels[pool] == c] for c in range(N_CLASSES)]
    if any(len(b) == 0 for b in by_class):
        raise ValueError("the digit pool needs at least one digit of every class")
    bank = make_noise_bank(PAPER_N_NOISE, 0) if noise_bank is None else noise_bank
    n_noise = default_n_noise(canvas) if n_noise is None else n_noise
    size = DIGIT_SIZE * digit_scale

    majority = int(rng.integers(N_CLASSES))
    maj_pool = by_class[majority]
    chosen = list(rng.choice(maj_pool, N_MAJORITY, replace=len(maj_pool) < N_MAJORITY))
    if distinct_others:
        others = rng.choice([c for c in range(N_CLASSES) if c != majority], N_OTHERS, replace=False)
        chosen += [rng.choice(by_class[int(c)]) for c in others]
    else:
        chosen += list(rng.choice(pool[labels[pool] != majority], N_OTHERS))
    boxes = _place_boxes(rng, len(chosen), size, canvas)
    placements = tuple(
        Placement(digit=int(labels[i]), index=int(i), row=r, col=c, size=size)
        for i, (r, c) in zip(chosen, boxes)
    )

    image = np.zeros(canvas, dtype=np.uint8)
    noise = np.stack(
        [
            rng.integers(0, canvas[0] - size + 1, n_noise),
            rng.integers(0, canvas[1] - size + 1, n_noise),
            rng.integers(0, len(bank), n_noise),
        ],
        axis=1,
    ).astype(np.int64)  # (K, 3): row, col, pattern
    for r, c, k in noise:
        box = image[r : r + size, c : c + size]
        np.maximum(box, _upscale(bank[k], digit_scale), out=box)
    for p in placements:  # a digit owns its whole box (as in the reference)
        digit = warp_digit(images[p.index], warp_rng, warp) if warp > 0 else images[p.index]
        image[p.row : p.row + size, p.col : p.col + size] = _upscale(digit, digit_scale)
    return MegapixelSample(image, placements, noise, labels_from_placements(placements))


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of canvas `index` of `split`: independent of how many canvases are made."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def megapixel_mnist_tasks() -> tuple[TaskConfig, ...]:
    """The four tasks of the IPS paper, named after the manifest's label columns."""
    return (
        TaskConfig(name="majority", kind="multiclass", num_classes=N_CLASSES),
        TaskConfig(name="max", kind="multiclass", num_classes=N_CLASSES),
        TaskConfig(name="top", kind="multiclass", num_classes=N_CLASSES),
        TaskConfig(name="multilabel", kind="multilabel", num_classes=N_CLASSES),
    )


def format_label(label: Label) -> str:
    """A label as a manifest cell: an int, or `;`-separated class indices for multi-label."""
    return ";".join(str(c) for c in label) if isinstance(label, tuple) else str(label)


def boxes_mask(placements: Sequence[Placement], canvas: tuple[int, int]) -> np.ndarray:
    """Bool `(H, W)`: the pixels of the digit boxes."""
    mask = np.zeros(canvas, dtype=bool)
    for p in placements:
        mask[p.row : p.row + p.size, p.col : p.col + p.size] = True
    return mask


def _write_canvas(
    sample: MegapixelSample,
    out_dir: Path,
    slide_id: str,
    split: str,
    patch_size: int,
    mask: np.ndarray,
    extra_grids: Sequence[GridSpec] = (),
) -> dict[str, str]:
    """One canvas's store under `out_dir/stores/` (grids, truth) -> its manifest row."""
    canvas = sample.image.shape
    store = write_store(
        sample.image[None],
        out_dir / "stores",
        slide_id,
        patch_size=patch_size,
        background=0,
        mask=mask,
        min_tissue=0.0,
        truth_masks={"digit": boxes_mask(sample.placements, canvas)},
        extra_grids=extra_grids,
        truth_attrs={
            "placements": [p.to_dict() for p in sample.placements],
            "labels": {k: list(v) if isinstance(v, tuple) else v for k, v in sample.labels.items()},
            "n_noise": len(sample.noise),
        },
    )
    row = {
        "slide_id": slide_id,
        "path": store.relative_to(out_dir).as_posix(),
        "split": split,
        "label": format_label(sample.labels["majority"]),
    }
    row.update({k: format_label(v) for k, v in sample.labels.items()})
    return row


def make_megapixel_mnist(
    mnist_csv: str | Path | tuple[np.ndarray, np.ndarray],
    out_dir: str | Path,
    n_train: int,
    n_val: int,
    n_test: int,
    canvas: int | tuple[int, int] = PAPER_CANVAS,
    seed: int = 0,
    *,
    patch_size: int = 50,
    digit_scale: int = 1,
    n_noise: int | None = None,
    distinct_others: bool = True,
    pool_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    train_warp: float = 0.0,
    extra_grids: Sequence[GridSpec] = (),
) -> Path:
    """Write a Megapixel MNIST dataset: one store per canvas under `out_dir/stores/`, and the manifest.

    `mnist_csv`: an MNIST CSV path, or `(images (N, 28, 28) uint8, labels (N,))`. Each split draws its
    digits from its own disjoint pool (`split_digit_pools(labels, pool_fractions, seed)`). Stores: one
    channel, background 0, grid `default` of `patch_size` patches at stride `patch_size` over the whole
    canvas (an all-ones mask and `min_tissue` 0 keep every patch: black canvas is not "no tissue" here),
    and truth `ips_truth/digit` `(N,)` = share of each patch inside a digit box, plus the placements and
    labels in the `ips_truth` attributes. `extra_grids`: further grids in every store (e.g.
    `GridSpec("halo", 1, 38, 24)`: at half resolution, patches overlapping so that every digit lies
    whole in one), each with its own `ips_truth/<grid>/digit`. `train_warp` > 0 warps the training canvases' digits
    (`warp_digit`); validation and test canvases are never warped. Manifest `out_dir/manifest.csv`:
    `slide_id,path,label,split,majority,max,top,multilabel` (`label` = `majority`; paths relative to
    `out_dir`). Returns its path.
    """
    canvas = (canvas, canvas) if isinstance(canvas, int) else tuple(canvas)
    if canvas[0] % patch_size or canvas[1] % patch_size:
        raise ValueError(
            f"canvas {canvas} must be a multiple of patch_size {patch_size}: the grid keeps "
            "only whole patches, so digits at the edge would be lost"
        )
    images, labels = load_mnist_csv(mnist_csv) if isinstance(mnist_csv, (str, Path)) else mnist_csv
    labels = np.asarray(labels, dtype=np.int64)
    pools = split_digit_pools(labels, pool_fractions, seed)
    bank = make_noise_bank(PAPER_N_NOISE, seed)
    out_dir = Path(out_dir)
    rows = []
    full_mask = np.ones((canvas[0] // patch_size, canvas[1] // patch_size), dtype=bool)
    for split, count in zip(SPLITS, (n_train, n_val, n_test)):
        if count and len(pools[split]) == 0:
            raise ValueError(f"split {split!r} has no digits (pool_fractions={tuple(pool_fractions)})")
        warp = train_warp if split == "train" else 0.0
        for i in range(count):
            sample = make_sample(
                images,
                labels,
                pools[split],
                sample_rng(seed, split, i),
                canvas=canvas,
                noise_bank=bank,
                n_noise=n_noise,
                digit_scale=digit_scale,
                distinct_others=distinct_others,
                warp=warp,
                warp_rng=np.random.default_rng([seed, SPLITS.index(split), i, 1]) if warp > 0 else None,
            )
            rows.append(
                _write_canvas(
                    sample, out_dir, f"mnist_{split}_{i:05d}", split, patch_size, full_mask, extra_grids
                )
            )
    params = {
        "canvas": list(canvas),
        "seed": seed,
        "patch_size": patch_size,
        "digit_scale": digit_scale,
        "n_noise": default_n_noise(canvas) if n_noise is None else n_noise,
        "distinct_others": distinct_others,
        "pool_fractions": list(pool_fractions),
        "train_warp": train_warp,
        "extra_grids": [g._asdict() for g in extra_grids],
        "pool_sizes": {s: len(p) for s, p in pools.items()},
        "counts": {"train": n_train, "val": n_val, "test": n_test},
    }
    (out_dir / "megapixel_mnist.json").write_text(json.dumps(params, indent=1))
    return write_manifest(out_dir / "manifest.csv", rows, ["slide_id", "path", "label", "split", *TASK_NAMES])
