"""Small objects among similar distractors: a low object-to-image H&E-like task with per-patch truth.

Each slide is tissue everywhere (the grid keeps every patch), rendered in optical density with the
Ruifrok-Johnston stain vectors as in `ips.synthetic.lesions`: blotchy eosin stroma and small
hematoxylin nuclei. On top, in positives and negatives alike, several distractors of two kinds:

- *clusters*: solid discs packed with large dark nuclei (radius 0.6-0.9 patch sizes);
- *vacuoles*: pale, empty discs (no stroma, no nuclei) as large as a target's lumen.

The target (positives only, exactly one) is a *gland*: a ring of the same large dark nuclei (as many as a
cluster of its size holds) around a pale lumen, outer radius 0.6-0.9 patch sizes, i.e. it touches about 4 patches and covers at most ~2% of a
512-px slide (`max_object_fraction` checks the share). Each ingredient of the
target (dark nuclei, pale lumen) also occurs in the distractors, in every slide: only the arrangement at
patch level (a pale centre rimmed by nuclei) tells a target from a distractor, not the slide's colour
statistics. Per-slide stain strength (x0.85-1.15 per stain) and background nuclear density vary.

Truth: `ips_truth/lesion` `(N,)` = share of each patch inside the target disc (outer radius), the same
name as the lesion datasets so `ips.demo.lesion_auroc` reads it; `ips_truth/distractor` `(N,)` the share
inside any distractor; attributes `{"label", "target": {...} | None, "distractors": [...], "patch_size"}`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ips.synthetic._store import stratified_splits, write_manifest, write_store
from ips.synthetic.lesions import EOSIN, HEMATOXYLIN, _blob_kernel, _smooth_field, _sprinkle, _stamp

OBJECT_RADIUS = (0.6, 0.9)  # in patch sizes: target and distractors alike
LUMEN_SHARE = (0.45, 0.6)  # the target's lumen radius / outer radius


@dataclass(frozen=True)
class SmallObject:
    """A planted object: kind 'gland' (the target), 'cluster' or 'vacuole'; centre (row, col), radius px."""

    kind: str
    center: tuple[int, int]
    radius: float

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "center": list(self.center), "radius": self.radius}


@dataclass(frozen=True)
class SmallObjectSlide:
    """`image` `(3, H, W)` uint8; `target_mask` / `distractor_mask` bool `(H, W)`; `objects` all planted."""

    image: np.ndarray
    target_mask: np.ndarray
    distractor_mask: np.ndarray
    objects: tuple[SmallObject, ...]

    @property
    def label(self) -> int:
        return int(any(o.kind == "gland" for o in self.objects))

    @property
    def target(self) -> SmallObject | None:
        return next((o for o in self.objects if o.kind == "gland"), None)


def disc_mask(shape: Sequence[int], center: Sequence[int], radius: float) -> np.ndarray:
    """Bool `shape` mask of the pixels whose centre lies within `radius` of `center`."""
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def _place(
    rng: np.random.Generator,
    shape: tuple[int, int],
    radii: Sequence[float],
    margin: int,
) -> list[tuple[tuple[int, int], float]]:
    """Non-overlapping discs (gap >= margin px) wholly inside the image; a disc that finds no room is dropped."""
    placed: list[tuple[tuple[int, int], float]] = []
    for r in radii:
        lo = int(np.ceil(r)) + 2
        for _ in range(200):
            c = (int(rng.integers(lo, shape[0] - lo)), int(rng.integers(lo, shape[1] - lo)))
            if all(np.hypot(c[0] - o[0], c[1] - o[1]) > r + ro + margin for o, ro in placed):
                placed.append((c, float(r)))
                break
    return placed


def _nuclei_in(
    rng: np.random.Generator, canvas: np.ndarray, where: np.ndarray, count: int, bank: list[np.ndarray]
) -> None:
    """Stamp `count` big dark nuclei at random pixels of `where` into `canvas` (max)."""
    pos = np.argwhere(where)
    if not len(pos) or count <= 0:
        return
    for c, k, v in zip(
        pos[rng.integers(0, len(pos), count)], rng.integers(0, len(bank), count), rng.uniform(1.1, 1.5, count)
    ):
        _stamp(canvas, bank[k], c, v)


def render_small_object_slide(
    rng: np.random.Generator,
    size: int,
    patch_size: int,
    *,
    positive: bool,
    n_distractors: tuple[int, int] = (4, 8),
    max_object_fraction: float | None = None,
) -> SmallObjectSlide:
    """One slide `(3, size, size)`: distractors (clusters and vacuoles), plus one gland when `positive`.

    `max_object_fraction`: raise ValueError when the target's disc covers more of the slide (None: no check).
    """
    h = w = size
    if size < 4 * patch_size:
        raise ValueError(f"slide {size} px is too small for patch size {patch_size} (>= 4 patches a side)")
    h_scale, e_scale = rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)
    nuc_density = 0.004 * rng.uniform(0.6, 1.4)

    n_dis = int(rng.integers(n_distractors[0], n_distractors[1] + 1))
    kinds = ["gland"] * int(positive) + [("cluster", "vacuole")[i % 2] for i in range(n_dis)]
    if n_dis >= 2:  # at least one of each kind, the rest at random
        kinds[int(positive) + 2 :] = [str(k) for k in rng.choice(["cluster", "vacuole"], n_dis - 2)]
    radii = rng.uniform(*OBJECT_RADIUS, len(kinds)) * patch_size
    placed = _place(rng, (h, w), radii, margin=patch_size // 2)
    if positive and len(placed) == 0:
        raise ValueError(f"no room for the target in a {size} px slide")
    # a vacuole is as large as a gland's lumen: its recorded radius is the pale disc's
    objects = tuple(
        SmallObject(k, c, r * rng.uniform(*LUMEN_SHARE) if k == "vacuole" else r)
        for k, (c, r) in zip(kinds, placed)
    )
    target = next((o for o in objects if o.kind == "gland"), None)
    if (
        target is not None
        and max_object_fraction is not None
        and np.pi * target.radius**2 > max_object_fraction * h * w
    ):
        raise ValueError(
            f"the target covers more than {max_object_fraction:.0%} of a {size} px slide; "
            "use a larger size or a smaller patch size"
        )

    fine = rng.standard_normal((h, w)).astype(np.float32)
    eosin = e_scale * (0.38 + 0.08 * _smooth_field(rng, (h, w), 16) + 0.03 * fine)
    nuclei = np.zeros((h, w), dtype=np.float32)
    _sprinkle(rng, nuclei, np.ones((h, w), bool), nuc_density, (1.5, 3.0), (0.7, 1.1))
    bank = [_blob_kernel(rng, [a, a * rng.uniform(0.7, 1.0)]) for a in rng.uniform(3.0, 4.5, 24)]
    target_mask = np.zeros((h, w), bool)
    distractor_mask = np.zeros((h, w), bool)
    pale = np.zeros((h, w), bool)
    for o in objects:
        disc = disc_mask((h, w), o.center, o.radius)
        # nuclei per object ~ its area, the same density for glands and clusters
        count = int(round(0.012 * np.pi * o.radius**2))
        if o.kind == "gland":
            target_mask |= disc
            lumen = disc_mask((h, w), o.center, o.radius * rng.uniform(*LUMEN_SHARE))
            pale |= lumen
            nuclei[lumen] = 0.0
            _nuclei_in(rng, nuclei, disc & ~lumen, count, bank)
            nuclei[lumen] = 0.0
        elif o.kind == "cluster":
            distractor_mask |= disc
            _nuclei_in(rng, nuclei, disc_mask((h, w), o.center, o.radius - 3), count, bank)
        else:  # vacuole
            distractor_mask |= disc
            pale |= disc
            nuclei[disc] = 0.0
    eosin = np.where(pale, 0.03 * np.abs(fine), eosin)
    hema = h_scale * (0.06 * ~pale + nuclei * (1.0 + 0.12 * fine))
    od = hema[..., None] * HEMATOXYLIN + np.maximum(eosin, 0)[..., None] * EOSIN
    od += 0.025 + 0.006 * rng.standard_normal((h, w, 1)).astype(np.float32)
    rgb = np.clip(255.0 * np.exp(-np.maximum(od, 0)), 0, 255).round().astype(np.uint8)
    return SmallObjectSlide(
        np.ascontiguousarray(rgb.transpose(2, 0, 1)), target_mask, distractor_mask, objects
    )


def slide_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of slide `index`: independent of how many slides are made."""
    return np.random.default_rng([seed, 0x534F, index])


def make_small_object_dataset(
    out_dir: str | Path,
    n_slides: int,
    size: int = 512,
    patch_size: int = 32,
    seed: int = 0,
    positive_fraction: float = 0.5,
    *,
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    n_distractors: tuple[int, int] = (4, 8),
    max_object_fraction: float | None = None,
) -> Path:
    """Write `n_slides` slides as stores under `out_dir/stores/` + `out_dir/manifest.csv`; returns the manifest.

    Grid `default`: every `patch_size` patch (tissue everywhere). Manifest columns
    `slide_id,path,label,split,n_distractors` (splits stratified by label).
    """
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    out_dir = Path(out_dir)
    labels = np.zeros(n_slides, dtype=np.int64)
    labels[: int(round(n_slides * positive_fraction))] = 1
    labels = np.random.default_rng([seed, 0x534C]).permutation(labels)
    splits = stratified_splits(labels.tolist(), split_fractions, seed)
    rows = []
    for i, label in enumerate(labels):
        slide = render_small_object_slide(
            slide_rng(seed, i),
            size,
            patch_size,
            positive=bool(label),
            n_distractors=n_distractors,
            max_object_fraction=max_object_fraction,
        )
        slide_id = f"smallobj_{i:04d}"
        store = write_store(
            slide.image,
            out_dir / "stores",
            slide_id,
            patch_size=patch_size,
            background=255,
            mask=np.ones((size // 8, size // 8), bool),
            min_tissue=0.0,
            spacing=(0.5, 0.5),
            truth_masks={"lesion": slide.target_mask, "distractor": slide.distractor_mask},
            truth_attrs={
                "label": slide.label,
                "target": slide.target.to_dict() if slide.target else None,
                "distractors": [o.to_dict() for o in slide.objects if o.kind != "gland"],
                "patch_size": patch_size,
            },
        )
        n_dis = sum(o.kind != "gland" for o in slide.objects)
        rows.append(
            {
                "slide_id": slide_id,
                "path": store.relative_to(out_dir).as_posix(),
                "label": slide.label,
                "split": splits[i],
                "n_distractors": n_dis,
            }
        )
    params = {
        "n_slides": n_slides,
        "size": size,
        "patch_size": patch_size,
        "seed": seed,
        "positive_fraction": positive_fraction,
        "split_fractions": list(split_fractions),
        "n_distractors": list(n_distractors),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "small_objects.json").write_text(json.dumps(params, indent=1))
    return write_manifest(
        out_dir / "manifest.csv", rows, ["slide_id", "path", "label", "split", "n_distractors"]
    )
