"""The streaming real-size slide writer (ips.synthetic.big_slide) at tiny sizes."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import tifffile

from data_prep.readers import open_reader
from ips.cli.main import main
from ips.data.store import open_store
from ips.data.zarr_source import ZarrPatchSource
from ips.synthetic.big_slide import BACKGROUND, BigSlideSpec, write_big_slide


def _mean2(img: np.ndarray) -> np.ndarray:
    """Oracle: 2x2 rounded mean, by plain slicing (not the writer's reshape)."""
    h, w = img.shape[0] // 2, img.shape[1] // 2
    a = img[: 2 * h, : 2 * w].astype(np.int64)
    s = a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]
    return ((s + 2) // 4).astype(np.uint8)


@pytest.fixture(scope="module")
def lossless(tmp_path_factory):
    """A 1,000 px slide (not a multiple of the tile), 128 px tiles, zlib so pixels compare exactly."""
    path = tmp_path_factory.mktemp("big") / "s.tiff"
    spec = BigSlideSpec(size=1000, seed=3, tile=128, compression="zlib")
    return write_big_slide(path, spec), spec


def test_levels_shapes_mpp_and_pyramid_are_exact(lossless):
    path, spec = lossless
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (128, 128)
        assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
        assert page.resolution == pytest.approx((40_000.0, 40_000.0))  # 0.25 um/px
        levels = [lvl.asarray() for lvl in tif.series[0].levels]
    assert [lv.shape for lv in levels] == [(1000, 1000, 3), (500, 500, 3), (250, 250, 3)]
    assert [lv.shape[:2] for lv in levels] == spec.level_shapes()
    for upper, lower in zip(levels, levels[1:]):
        np.testing.assert_array_equal(lower, _mean2(upper))
    # tissue and glass both present, and the glass is the background colour
    bg = np.all(levels[0] == np.array(BACKGROUND, np.uint8), axis=-1)
    stained = levels[0][..., 1] < 200  # eosin and hematoxylin both take green away; glass is 240
    assert bg.mean() > 0.1 and stained.mean() > 0.1 and not (bg & stained).any()


def test_the_reader_sees_40x_and_the_levels(lossless):
    path, _ = lossless
    reader = open_reader(path)
    try:
        assert reader.spacing == pytest.approx((0.25, 0.25))
        assert reader.spatial_shape == (1000, 1000)
    finally:
        reader.close()


def test_same_seed_same_pixels_other_seed_other_pixels(tmp_path, lossless):
    path, spec = lossless
    again = write_big_slide(tmp_path / "again.tiff", spec)
    other = write_big_slide(
        tmp_path / "other.tiff", BigSlideSpec(size=1000, seed=4, tile=128, compression="zlib")
    )
    a, b, c = (tifffile.imread(p) for p in (path, again, other))
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.1
    assert not list(tmp_path.glob(".*.raw"))  # the scratch files are gone


@pytest.mark.parametrize(
    "flags, level",
    [(["--mpp", "0.25"], 0), (["--mpp", "0.5", "--store-from", "grid"], 1)],
    ids=["40x-level0", "20x-from-level1"],
)
def test_prep_patches_equal_the_written_pixels(lossless, tmp_path, flags, level):
    path, _ = lossless
    out = tmp_path / "out"
    rc = main(["prep", str(path), "--out", str(out), "--patch-size", "64", *flags, "--quiet"])
    assert rc == 0
    store = open_store(out / "s.zarr")
    assert store.spacing == [0.25 * 2**level] * 2
    with tifffile.TiffFile(path) as tif:
        pixels = tif.series[0].levels[level].asarray()  # (Y, X, 3) at the grid's mpp
    coords = store.coords("default")
    assert len(coords) > 0
    patches = ZarrPatchSource(out / "s.zarr").read(np.arange(len(coords))).numpy()  # (N, 3, 64, 64)
    for (r, c), patch in zip(coords, patches):
        np.testing.assert_array_equal(patch, pixels[r : r + 64, c : c + 64].transpose(2, 0, 1))


def test_jpeg_slide_is_close_to_the_lossless_one(lossless, tmp_path):
    path, spec = lossless
    jpeg = write_big_slide(tmp_path / "j.tiff", BigSlideSpec(size=1000, seed=3, tile=128, quality=90))
    with tifffile.TiffFile(jpeg) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.JPEG
        j = tif.series[0].levels[0].asarray().astype(np.float64)
    exact = tifffile.imread(path).astype(np.float64)
    assert np.abs(j - exact).mean() < 4.0


def _peak_bytes(tmp_path, size: int) -> int:
    tracemalloc.start()
    write_big_slide(tmp_path / f"m{size}.tiff", BigSlideSpec(size=size, seed=0, tile=128))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


@pytest.mark.slow
def test_writer_memory_does_not_grow_with_the_slide(tmp_path):
    """9x the pixels, about the same peak: the writer streams tiles (a level would be 3 bytes per pixel)."""
    small, large = _peak_bytes(tmp_path, 1024), _peak_bytes(tmp_path, 3072)
    assert large < 1.15 * small
    assert large < 3072 * 3072 * 3 / 4  # far below a quarter of level 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tile": 100}, "multiple of 16"),
        ({"size": 100, "tile": 64}, "at least two tiles"),
        ({"mpp": 0.0}, "mpp"),
        ({"tissue_share": 1.0}, "tissue_share"),
    ],
)
def test_bad_specs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BigSlideSpec(**kwargs)


def test_cli_writes_the_slide_and_refuses_a_bad_size(tmp_path, capsys):
    out = tmp_path / "c.tiff"
    assert main(["synth", "big-slide", "--out", str(out), "--size", "256", "--tile", "128", "--quiet"]) == 0
    assert tifffile.imread(out).shape == (256, 256, 3)
    assert main(["synth", "big-slide", "--out", str(out), "--size", "100", "--tile", "64"]) == 2
    assert "ips synth big-slide: size 100 must be at least two tiles" in capsys.readouterr().err
