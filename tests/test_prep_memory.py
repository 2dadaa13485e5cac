"""Prep's memory on large slides: the tissue mask of a large level is computed without whole-level float
copies (the mask level of a big slide is up to 2048 px square)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy import ndimage as ndi

from data_prep.testing import tissue_image
from data_prep.tissue import _saturation, tissue_mask


def test_banded_saturation_equals_the_whole_image_formula():
    """Row bands (the last one short) give the same float32 saturation as one whole-image pass."""
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (3, 150, 70), dtype=np.uint8)
    img[:, :10] = 0  # max 0: saturation 0
    rgb = img.astype(np.float64)
    hi, lo = rgb.max(axis=0), rgb.min(axis=0)
    expect = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1), 0)  # (Y, X), float64 oracle
    got = _saturation(img, band=64)
    assert got.dtype == np.float32 and got.shape == (150, 70)
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=0)
    assert (got[:10] == 0).all()


def test_tissue_mask_peak_memory_is_a_few_bytes_per_pixel():
    """The mask of a 1024 x 1024 RGB level peaks at under 10 bytes of traced memory per pixel: the float32
    saturation (4), then one int32 label image (4) with the mask and its complement; whole-image median
    and Otsu copies, skimage's bool temporaries and bincount's int64 cast of the labels took 18."""
    img = np.ascontiguousarray(tissue_image(1024, 1024, box=(0.1, 0.1, 0.9, 0.9)).transpose(2, 0, 1))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        mask, info = tissue_mask(img, background=255, spacing=(0.5, 0.5), downsample=(16, 16))
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert peak < 10 * 1024 * 1024, peak / 1024**2
    # the same mask as the saturation computed whole, median-filtered and thresholded
    rgb = img.astype(np.float32)
    hi, lo = rgb.max(axis=0), rgb.min(axis=0)
    sat = ndi.median_filter(np.where(hi > 0, (hi - lo) / np.maximum(hi, 1), 0).astype(np.float32), size=3)
    inside = sat > info["threshold"]
    assert info["method"] == "otsu-saturation"
    # hole filling / small-object removal only flip pixels of small components: nearly all agree
    assert (mask == inside).mean() > 0.99 and 0.5 < mask.mean() < 0.75


@pytest.mark.parametrize("shape, band", [((150, 70), 64), ((64, 33), 64), ((9, 5), 1), ((10, 12), 3)])
def test_banded_median_equals_the_whole_image_filter(shape, band):
    from data_prep.tissue import _median3

    img = np.random.default_rng(1).random(shape, dtype=np.float32)
    expect = ndi.median_filter(img, size=3)
    got = _median3(img.copy(), band=band)
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("shape", [(150, 70), (5, 40, 30)])
def test_banded_otsu_equals_one_histogram_of_the_whole_image(shape):
    from skimage.filters import threshold_otsu

    from data_prep.tissue import _otsu

    values = np.random.default_rng(2).gamma(2.0, size=shape).astype(np.float32)
    lo, hi = float(values.min()), float(values.max())
    q = ((values - lo) * np.float32(255.0 / (hi - lo))).astype(np.uint8)  # the whole image at once
    hist = np.bincount(q.ravel(), minlength=256)
    centres = lo + (np.arange(256) + 0.5) * (hi - lo) / 256
    assert _otsu(values, band=7) == float(threshold_otsu(hist=(hist, centres)))


@pytest.mark.parametrize("shape", [(300, 170), (12, 40, 30)])
@pytest.mark.parametrize("max_size", [1, 5, 40])
def test_small_holes_and_objects_as_skimage_removes_them(shape, max_size):
    from skimage.morphology import remove_small_holes, remove_small_objects

    from data_prep.tissue import _fill_small

    rng = np.random.default_rng(max_size)
    mask = ndi.uniform_filter(rng.random(shape), size=3) > 0.5  # blobs and holes of many sizes
    holes = mask.copy()
    _fill_small(holes, max_size, holes=True, band=7)
    np.testing.assert_array_equal(holes, remove_small_holes(mask, max_size=max_size))
    objects = holes.copy()
    _fill_small(objects, max_size, holes=False, band=7)
    np.testing.assert_array_equal(objects, remove_small_objects(holes, max_size=max_size))
    assert (holes != mask).any() and (objects != holes).any()  # both changed something
