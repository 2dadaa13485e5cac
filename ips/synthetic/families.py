"""The learnability families: one generator per task class that real cohorts pose, by letter.

| key | task | generator |
|---|---|---|
| a | an object smaller than a patch's neighbourhood among similar distractors (glands among clusters) | `ips.synthetic.small_objects.make_small_object_dataset` |
| b | an object larger than a patch (48-px handwritten marks at 32-px patches) among similar marks | `ips.synthetic.marks.make_split_marks` |
| c | the same on 768-px slides (576 patches; the target's ink < 0.2% of the slide) | `ips.synthetic.marks.make_sparse_marks` |
| d | a tumour-like texture region among inflamed regions | `ips.synthetic.textures.make_texture_regions` |
| e | a real brain MRI (MNI152) with one small planted lesion, intensity and bias-field variation | `ips.synthetic.brain.make_brain_lesions` |
| f | a count task: positive only with 2 or more target marks | `ips.synthetic.marks.make_count_marks` |

`FAMILIES[key].make(out_dir, n_slides, seed=..., digits=...)` writes stores as `ips prep` makes them
(`--patch-size` = the family's `patch_size`) and a manifest with train/val/test splits; the truth of
each patch is `ips_truth/lesion` (share inside the target).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ips.synthetic._store import GridSpec

Maker = Callable[..., Path]


@dataclass(frozen=True)
class Family:
    """A task family: its `key` (a-f), a short `name`, 2 or 3 `spatial_dims`, the `patch_size` of its
    stores, the `default_slides` of a full-size run, whether it needs MNIST `digits`, and `make`."""

    key: str
    name: str
    spatial_dims: int
    patch_size: int
    default_slides: int
    needs_digits: bool
    make: Maker

    def generate(
        self,
        out_dir: str | Path,
        n_slides: int,
        *,
        seed: int,
        digits: str | Path | None,
        extra_grids: Sequence[GridSpec] = (),
    ) -> Path:
        """Write the family's dataset under `out_dir` (`extra_grids`: further grids in every store, where
        the family's generator takes them); returns the manifest path."""
        kwargs: dict[str, Any] = {"seed": seed}
        if extra_grids:
            kwargs["extra_grids"] = tuple(extra_grids)
        if self.needs_digits:
            if digits is None:
                raise ValueError(f"family {self.key} ({self.name}) needs an MNIST CSV of handwritten digits")
            kwargs["digits"] = digits
        return self.make(out_dir, n_slides, **kwargs)


def _small_objects(out_dir: str | Path, n_slides: int, *, seed: int) -> Path:
    from ips.synthetic.small_objects import make_small_object_dataset

    return make_small_object_dataset(out_dir, n_slides, seed=seed)


def _lazy(module: str, name: str) -> Maker:
    """A maker imported on first call (the brain family needs nilearn, the others do not)."""

    def make(*args: Any, **kwargs: Any) -> Path:
        import importlib

        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    make.__name__ = name
    return make


FAMILIES: dict[str, Family] = {
    f.key: f
    for f in (
        Family("a", "small objects", 2, 32, 400, False, _small_objects),
        Family(
            "b",
            "marks split over patches",
            2,
            32,
            400,
            True,
            _lazy("ips.synthetic.marks", "make_split_marks"),
        ),
        Family("c", "sparse marks", 2, 32, 400, True, _lazy("ips.synthetic.marks", "make_sparse_marks")),
        Family(
            "d", "texture region", 2, 32, 400, False, _lazy("ips.synthetic.textures", "make_texture_regions")
        ),
        Family("e", "brain lesion", 3, 16, 200, False, _lazy("ips.synthetic.brain", "make_brain_lesions")),
        Family("f", "count", 2, 32, 400, True, _lazy("ips.synthetic.marks", "make_count_marks")),
    )
}


def family(key: str) -> Family:
    """The family of letter `key`; ValueError naming the valid ones otherwise."""
    if key not in FAMILIES:
        raise ValueError(f"unknown family {key!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[key]
