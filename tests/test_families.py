"""The learnability families: each writes stores as `ips prep` would, balanced labels and splits, and truth
that marks the target (checked against the generator's own record, not against itself)."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from ips.synthetic.families import FAMILIES, family
from ips.synthetic.marks import render_marks_slide
from ips.synthetic.textures import render_texture_slide

DIGITS = Path(os.environ.get("IPS_TEST_DATA", "/nonexistent")) / "mnist_5k.csv.gz"
needs_digits = pytest.mark.skipif(not DIGITS.is_file(), reason="needs IPS_TEST_DATA/mnist_5k.csv.gz")


def rows_of(manifest: Path) -> list[dict]:
    with manifest.open() as f:
        return list(csv.DictReader(f))


def test_registry_has_the_six_families_and_rejects_others():
    assert sorted(FAMILIES) == list("abcdef")
    assert family("e").spatial_dims == 3 and family("e").patch_size == 16
    assert all(FAMILIES[k].patch_size == 32 and FAMILIES[k].spatial_dims == 2 for k in "abcdf")
    with pytest.raises(ValueError, match="unknown family 'g'; valid: a, b, c, d, e, f"):
        family("g")
    with pytest.raises(ValueError, match="needs an MNIST CSV"):
        family("b").generate("unused", 10, seed=0, digits=None)


def check_dataset(manifest: Path, n: int, patch: int, count: bool = False) -> list[dict]:
    rows = rows_of(manifest)
    assert len(rows) == n
    labels = [int(r["label"]) for r in rows]
    assert sum(labels) == n // 2
    for split in ("train", "val", "test"):
        assert {int(r["label"]) for r in rows if r["split"] == split} == {0, 1}, split
    for r in rows:
        store = zarr.open_group(str(manifest.parent / r["path"]), mode="r")
        grid = store["grids/default"]
        assert grid.attrs["patch_size"] == [patch, patch] and grid.attrs["stride"] == [
            patch,
            patch,
        ]  # as prep
        share = np.asarray(store["ips_truth/lesion"][...])
        assert share.shape == (grid["coords"].shape[0],)
        assert store["ips_truth"].attrs["label"] == int(r["label"])
        # a negative holds no target; a positive's target lies on its grid
        if not count:  # (a count task's negative may hold one target)
            assert (share.max() > 0) == bool(int(r["label"])), r["slide_id"]
    return rows


@pytest.mark.slow
def test_texture_family_writes_a_balanced_prep_like_dataset(tmp_path):
    manifest = family("d").generate(tmp_path, 10, seed=3, digits=None)
    check_dataset(manifest, 10, 32)
    assert json.loads((tmp_path / "family.json").read_text())["family"] == "texture"


def test_texture_regions_truth_is_the_tumour_only():
    rng = np.random.default_rng(1)
    item = render_texture_slide(rng, size=512, patch_size=32, positive=True)
    assert item.image.shape == (3, 512, 512) and item.image.dtype == np.uint8
    tumour, inflamed = item.masks["lesion"], item.masks["distractor"]
    assert tumour.any() and inflamed.any() and not (tumour & inflamed).any()
    # the tumour region is darker in hematoxylin (more nuclear stain) than plain tissue around it
    grey = item.image.astype(float).mean(axis=0)
    assert grey[tumour].mean() < grey[~(tumour | inflamed)].mean()
    neg = render_texture_slide(np.random.default_rng(1), size=512, patch_size=32, positive=False)
    assert not neg.masks["lesion"].any() and neg.attrs["regions"].count("tumour") == 0


@pytest.mark.slow
@needs_digits
@pytest.mark.parametrize("key, size", [("b", 512), ("c", 768), ("f", 512)])
def test_mark_families(tmp_path, key, size):
    manifest = family(key).generate(tmp_path, 10, seed=0, digits=DIGITS)
    rows = check_dataset(manifest, 10, 32, count=key == "f")
    store = zarr.open_group(str(manifest.parent / rows[0]["path"]), mode="r")
    assert store["0"].shape == (3, size, size)
    for r in rows:
        attrs = store = zarr.open_group(str(manifest.parent / r["path"]), mode="r")["ips_truth"].attrs
        targets = sum(d["target"] for d in attrs["digits"])
        assert targets == attrs["targets"]
        if key == "f":  # count: positive iff 2 or more targets
            assert (targets >= 2) == bool(int(r["label"])) and targets <= 3
        else:
            assert targets == int(r["label"])
        assert len(attrs["digits"]) - targets >= 4  # at least 4 similar distractor marks


@needs_digits
def test_marks_larger_than_a_patch_and_sparse_marks_small_in_the_slide():
    from ips.synthetic.marks import DigitBank

    bank = DigitBank(DIGITS)
    item = render_marks_slide(
        np.random.default_rng(0),
        bank,
        "test",
        size=768,
        mark_size=48,
        n_targets=1,
        n_distractors=(4, 6),
        target_digit=7,
    )
    target = item.masks["lesion"]
    rows, cols = np.nonzero(target)
    assert max(np.ptp(rows), np.ptp(cols)) > 32  # no 32-px patch holds it whole
    assert target.mean() <= 0.004  # the ink (dilated) under 0.4% of a 768-px slide
    assert bank.pools["test"].size and not set(bank.pools["test"]) & set(bank.pools["train"])


@pytest.mark.slow
def test_brain_family(tmp_path):
    pytest.importorskip("nilearn")
    from ips.synthetic.brain import render_brain

    pos = render_brain(np.random.default_rng(0), positive=True)
    neg = render_brain(np.random.default_rng(0), positive=False)
    assert pos.image.shape == (1, 99, 117, 95) and pos.image.dtype == np.uint8
    lesion = pos.masks["lesion"]
    assert 100 < lesion.sum() < 3000 and not neg.masks["lesion"].any()
    # hypointense: the lesion is darker than the same place in a scan without it (same seed: same scan)
    assert pos.image[0][lesion].mean() < 0.8 * neg.image[0][lesion].mean()
