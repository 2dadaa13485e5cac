"""The one colour scale of attention (`ips.infer.scale`), shared by the heatmap PNG, the viewer's overlay
and the GeoJSON: exact values, the flat-map case, thresholds, the global scale, bad arguments."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from ips.infer.render import save_overlay
from ips.infer.scale import (
    ALPHA_MAX,
    GLOBAL_TOP,
    MIN_TOP,
    Scale,
    cohort_scale,
    colorize,
    colour_table,
    global_scale,
    legend_text,
    log_ratio,
    peak,
    per_slide,
    ratio_text,
    relative,
)


@pytest.mark.parametrize("n", [1, 4, 7, 31, 1000, 250_000])
def test_flat_attention_is_transparent_whatever_n(n):
    """The issue: uniform attention 1/N was painted solid dark red. Float32 shares of 1/N included."""
    a = np.full(n, 1.0 / n, dtype=np.float32)
    r = log_ratio(a)
    assert np.abs(r).max() < 1e-6
    scale = per_slide(a)
    assert scale.top == MIN_TOP and scale.threshold == 0.0
    rgba = colorize(r, scale)
    assert rgba.shape == (n, 4) and rgba[:, 3].max() == 0  # every patch transparent
    assert colorize(r, global_scale())[:, 3].max() == 0


def test_near_flat_map_stays_nearly_transparent():
    """A 3D volume at near-uniform attention: shares 0.0320..0.0324 once filled the whole colour range."""
    a = np.linspace(0.0320, 0.0324, 31)
    a = a / a.sum()
    rgba = colorize(log_ratio(a), per_slide(a))
    assert rgba[:, 3].max() <= 2  # of 255: ratios within 1.7% of uniform are all but invisible


def test_log_ratio_exact_values():
    a = np.asarray([0.5, 0.25, 0.125, 0.125, 0.0])
    np.testing.assert_array_equal(relative(a), [2.5, 1.25, 0.625, 0.625, 0.0])
    a = np.asarray([0.5, 0.25, 0.125, 0.125])
    np.testing.assert_array_equal(log_ratio(a), [1.0, 0.0, -1.0, -1.0])
    np.testing.assert_array_equal(log_ratio(np.asarray([1.0, 0.0])), [1.0, -30.0])  # FLOOR, not -inf
    both = np.asarray([[0.5, 0.25], [0.5, 0.75]])  # (N, T): N = 2 rows
    np.testing.assert_allclose(log_ratio(both), [[0.0, -1.0], [0.0, math.log2(1.5)]])


def test_scale_positions_exact():
    s = Scale(top=4.0, threshold=1.0)
    pos = s.position(np.asarray([0.5, 1.0, 2.5, 4.0, 5.0, np.nan, -np.inf]))
    np.testing.assert_array_equal(np.isnan(pos), [True, True, False, False, False, True, True])
    np.testing.assert_array_equal(pos[2:5], [0.5, 1.0, 1.0])
    a = np.asarray([0.5, 0.25, 0.125, 0.125])  # r = 1, 0, -1, -1
    pos = per_slide(a).position(log_ratio(a))
    assert pos[0] == 1.0 and np.isnan(pos[1:]).all()
    a = np.asarray([0.8, 0.1, 0.05, 0.05])  # r0 = log2(3.2): the slide's own peak is the top
    assert per_slide(a).top == pytest.approx(math.log2(3.2))
    assert per_slide(a, threshold=2.0).top == 3.0  # never at or below the threshold


def test_colour_table_and_colorize_exact():
    t = colour_table()
    assert t.shape == (256, 4)
    assert t[0, 3] == 0.0 and t[-1, 3] == ALPHA_MAX and np.all(np.diff(t[:, 3]) >= 0)
    assert t[64, 3] == pytest.approx(ALPHA_MAX * (64 / 255) / 0.5)
    assert ALPHA_MAX <= 0.7  # full colour still shows the tissue beneath
    top = t[-1]
    assert top[:3].mean() < 0.4 and top[:3].max() - top[:3].min() > 0.4  # dark, saturated red
    table = np.rint(t * 255).astype(np.uint8)
    s = Scale(top=2.0)
    got = colorize(np.asarray([[2.0, 1.0], [0.0, 9.0]]), s)  # any shape S -> (*S, 4)
    assert got.shape == (2, 2, 4)
    np.testing.assert_array_equal(got[0, 0], table[255])
    np.testing.assert_array_equal(got[0, 1], table[128])  # position 0.5 -> rint(127.5) = 128
    np.testing.assert_array_equal(got[1, 0], [0, 0, 0, 0])
    np.testing.assert_array_equal(got[1, 1], table[255])


def test_global_scale_compares_slides():
    """The same ratio to uniform is the same colour on slides of different N; per-slide scales differ."""
    a = np.full(10, 0.6 / 9)
    a[0] = 0.4  # N = 10: ratio 4 at patch 0
    b = np.full(100, 0.96 / 99)
    b[0] = 0.04  # N = 100: ratio 4 at patch 0
    g = global_scale()
    assert g.top == GLOBAL_TOP and g.kind == "global"
    np.testing.assert_array_equal(colorize(log_ratio(a), g)[0], colorize(log_ratio(b), g)[0])
    assert per_slide(a).top == pytest.approx(2.0) and per_slide(b).top == pytest.approx(2.0)
    c = np.full(10, 0.2 / 9)
    c[0] = 0.8  # ratio 8: per slide it is full colour, globally half way up
    assert colorize(log_ratio(c), per_slide(c))[0, 3] == round(ALPHA_MAX * 255)
    np.testing.assert_array_equal(colorize(log_ratio(c), g)[0], np.rint(colour_table()[128] * 255))


def test_ratio_text():
    assert [ratio_text(v) for v in (0.0, 3.0, -1.0, 6.0)] == ["1x", "8x", "0.5x", "64x"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top": 1.0, "threshold": 1.0},
        {"top": 0.5, "threshold": 1.0},
        {"top": np.nan},
        {"top": 2.0, "kind": "x"},
    ],
)
def test_bad_scales_raise(kwargs):
    with pytest.raises(ValueError):
        Scale(**kwargs)


def test_png_of_a_flat_map_equals_the_png_without_a_map(tmp_path):
    """The PNG renders flat attention as nothing at all: pixel for pixel the thumbnail alone; a peak shows."""
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(150, 256, size=(48, 64, 3), dtype=np.uint8)
    scale = per_slide(np.full(12, 1 / 12))

    def png(heat):
        path = save_overlay(
            tmp_path / "h.png", base, [heat], ["t"], suptitle="s", colorbar_label="c", scales=[scale]
        )
        return np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))

    flat, none = png(np.zeros((48, 64))), png(np.full((48, 64), np.nan))
    np.testing.assert_array_equal(flat, none)
    hot = np.zeros((48, 64))
    hot[10:20, 10:20] = 1.0  # twice uniform: full colour on this scale
    assert np.abs(png(hot).astype(int) - none.astype(int)).max() > 60


def test_cohort_scale_same_colour_for_the_same_ratio_on_every_slide():
    """Slide A (N = 100) peaks at 16x uniform and has a patch at 4x; slide B (N = 10) peaks at 4x. One
    scale over both tops out at A's peak (log2 16 = 4), so 4x is half way up on both; per slide, 4x is
    half way on A and full colour on B."""
    a = np.full(100, (1.0 - 0.2) / 98)
    a[0], a[1] = 0.16, 0.04  # N * a = 16 and 4; the rest share what is left
    b = np.full(10, 0.6 / 9)
    b[0] = 0.4  # N * a = 4
    cohort = cohort_scale([peak(a), peak(b)])
    assert cohort.top == pytest.approx(4.0) and cohort.kind == "global" and cohort.slides == 2
    table = np.rint(colour_table() * 255)
    ga, gb = colorize(log_ratio(a), cohort)[1], colorize(log_ratio(b), cohort)[0]
    np.testing.assert_array_equal(ga, gb)
    np.testing.assert_array_equal(ga, table[128])  # (2 - 0) / (4 - 0) = 0.5 -> entry 128 of 256
    sa, sb = colorize(log_ratio(a), per_slide(a))[1], colorize(log_ratio(b), per_slide(b))[0]
    np.testing.assert_array_equal(sa, table[128])
    np.testing.assert_array_equal(sb, table[255])
    assert "2 slides drawn together" in legend_text(cohort)
    assert cohort.to_dict() == {"top": cohort.top, "threshold": 0.0, "kind": "global", "slides": 2}


def test_cohort_scale_floor_and_threshold():
    assert cohort_scale([0.1, 0.3]).top == MIN_TOP  # two near-flat slides are not stretched
    assert cohort_scale([0.5], threshold=2.0).top == 2.0 + MIN_TOP
    assert cohort_scale([5.0, 2.0], threshold=1.0).threshold == 1.0
    assert peak(np.zeros(0)) == 0.0


def test_png_colours_follow_the_shared_scale(tmp_path):
    """Rendered PNGs, not just the colour function: two slides' heat maps (same thumbnail) with the same
    4x-uniform block; slide A also has a 16x block. With one global scale the 4x block's pixels are the
    same on both PNGs; with per-slide scales they differ (half way up on A, full colour on B)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    base = rng.integers(150, 256, size=(96, 128, 3), dtype=np.uint8)
    heat_a = np.full((96, 128), np.nan)
    heat_a[16:80, 8:56] = 2.0
    heat_a[16:80, 72:120] = 4.0
    heat_b = np.full((96, 128), np.nan)
    heat_b[16:80, 8:56] = 2.0

    def pixel(heat, scale, name):
        path = save_overlay(
            tmp_path / name, base, [heat], ["t"], suptitle="s", colorbar_label="c", scales=[scale]
        )
        rgb = np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB")).astype(int)
        return rgb, rgb[rgb.shape[0] // 2, int(rgb.shape[1] * 0.25)]  # inside the 4x block

    cohort = cohort_scale([4.0, 2.0])
    (img_a, ga), (img_b, gb) = pixel(heat_a, cohort, "ga.png"), pixel(heat_b, cohort, "gb.png")
    np.testing.assert_array_equal(ga, gb)
    assert img_a.shape == img_b.shape
    (_, sa), (_, sb) = (
        pixel(heat_a, Scale(top=4.0), "sa.png"),
        pixel(heat_b, Scale(top=2.0), "sb.png"),
    )
    assert np.abs(sa - sb).max() > 20
    np.testing.assert_array_equal(sa, ga)  # A's own peak is the cohort's: the same colours
