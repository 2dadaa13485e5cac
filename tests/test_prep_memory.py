"""Prep's memory on large slides: the tissue mask of a large level is computed without whole-level float
copies (the mask level of a big slide is up to 2048 px square)."""

from __future__ import annotations

import tracemalloc

import numpy as np
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
    """The mask of a 1024 x 1024 RGB level peaks at under 24 bytes of traced memory per pixel (a
    whole-level float32 RGB copy with its max, min and quotient temporaries alone is 28)."""
    img = np.ascontiguousarray(tissue_image(1024, 1024, box=(0.1, 0.1, 0.9, 0.9)).transpose(2, 0, 1))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        mask, info = tissue_mask(img, background=255, spacing=(0.5, 0.5), downsample=(16, 16))
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert peak < 24 * 1024 * 1024, peak / 1024**2
    # the same mask as the saturation computed whole, median-filtered and thresholded
    rgb = img.astype(np.float32)
    hi, lo = rgb.max(axis=0), rgb.min(axis=0)
    sat = ndi.median_filter(np.where(hi > 0, (hi - lo) / np.maximum(hi, 1), 0).astype(np.float32), size=3)
    inside = sat > info["threshold"]
    assert info["method"] == "otsu-saturation"
    # hole filling / small-object removal only flip pixels of small components: nearly all agree
    assert (mask == inside).mean() > 0.99 and 0.5 < mask.mean() < 0.75
