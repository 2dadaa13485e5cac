"""The readers labs have: DICOM-WSI and Hamamatsu NDPI through OpenSlide 4, `--source-mpp` for files
without a pixel size, and non-pyramidal slides (a warning; the pyramid is built). MIRAX (.mrxs) has no
fixture: it is a folder of proprietary index and data files that nothing installable here writes."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from data_prep.readers import OpenSlideReader, open_reader, pyramid_warning
from data_prep.testing import ReaderTests, tissue_image, write_dicom_wsi, write_ndpi, write_pyramid_tiff
from ips.cli.main import main


def _dicom(*args, **kwargs):
    pytest.importorskip("pydicom")  # a test dependency: it writes the fixtures (OpenSlide reads them)
    return write_dicom_wsi(*args, **kwargs)


def _store(path):
    return zarr.open_group(str(path), mode="r")


class TestDicomWsi(ReaderTests):
    """A DICOM whole-slide image (one file per level, uncompressed frames, a partial last tile row and
    column) read through OpenSlide: the exact pixels and the pixel spacing of its functional groups."""

    detected_as = "openslide"
    expected_spacing = (0.25, 0.25)

    def open(self, tmp_path):
        img = tissue_image(150, 200)
        path = _dicom(tmp_path / "dcm", img, levels=2, tile=64, mpp=0.25)
        return OpenSlideReader(path), img.transpose(2, 0, 1)

    def test_vendor_and_levels(self, case):
        reader, _ = case
        assert reader.vendor == "dicom" and reader.file_levels() == 2


def test_prep_reads_a_dicom_made_from_the_real_svs(test_data, tmp_path, capsys):
    """The shared SVS written as DICOM-WSI (3 levels, 240 px frames like the SVS's tiles): `ips prep`
    reads it through OpenSlide, and every patch of the grid equals the SVS's pixels there."""
    svs = test_data / "cmu_small_region.svs"
    pixels = tifffile.imread(svs)  # (Y, X, 3)
    dcm = _dicom(tmp_path / "dicom", pixels, levels=3, tile=240, mpp=0.499, name="cmu")
    out = tmp_path / "out"
    args = ["prep", str(dcm), "--out", str(out), "--patch-size", "224", "--codec", "blosc-lz4", "--quiet"]
    assert main(args) == 0
    capsys.readouterr()
    g = _store(out / "cmu_level0.zarr")
    attrs = g.attrs["ips"]
    assert attrs["provenance"]["reader"] == "openslide" and attrs["provenance"]["vendor"] == "dicom"
    assert attrs["spacing"] == pytest.approx([0.499, 0.499])
    level0 = g["0"]
    assert level0.shape == (3, *pixels.shape[:2])
    coords = g["grids/default/coords"][...]
    assert len(coords) > 20
    for r, c in coords[:: max(1, len(coords) // 25)]:
        np.testing.assert_array_equal(
            level0[:, r : r + 224, c : c + 224], pixels[r : r + 224, c : c + 224].transpose(2, 0, 1)
        )


class TestNdpi(ReaderTests):
    """A Hamamatsu NDPI (JPEG levels in a TIFF with NDPI tags) through OpenSlide: level 0 as its JPEG
    decodes, and the pixel size of its resolution tags."""

    detected_as = "openslide"
    expected_spacing = (0.5, 0.5)

    def open(self, tmp_path):
        path, decoded = write_ndpi(tmp_path / "s.ndpi", tissue_image(120, 176), levels=2, mpp=0.5)
        return OpenSlideReader(path), decoded.transpose(2, 0, 1)

    def test_vendor(self, case):
        assert case[0].vendor == "hamamatsu"


def test_prep_reads_an_ndpi(tmp_path, capsys):
    img = tissue_image(256, 320, box=(0.1, 0.1, 0.8, 0.8))
    path, decoded = write_ndpi(tmp_path / "slide.ndpi", img, levels=2, mpp=0.5)
    assert np.abs(decoded.astype(int) - img).max() > 0  # lossy: the decoded JPEG is the truth, not img
    out = tmp_path / "out"
    argv = ["prep", str(path), "--out", str(out), "--patch-size", "32", "--mpp", "1.0", "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    g = _store(out / "slide.zarr")
    assert g.attrs["ips"]["provenance"]["vendor"] == "hamamatsu"
    assert g.attrs["ips"]["grids"]["default"]["level"] == 1
    np.testing.assert_array_equal(g["0"][...], decoded.transpose(2, 0, 1))


# --- a pixel size the file does not have ---------------------------------------------------------------


def test_mpp_missing_is_one_line_naming_the_file_and_source_mpp_gives_it(tmp_path, capsys):
    img = tissue_image(256, 320)
    src = write_pyramid_tiff(tmp_path / "nompp.tif", img, levels=1, tile=32, mpp=None)
    with open_reader(src) as r:
        assert r.spacing is None
    out = tmp_path / "out"
    assert main(["prep", str(src), "--out", str(out), "--patch-size", "32", "--mpp", "1.0", "--quiet"]) == 1
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and str(src) in failed[0] and "--source-mpp" in failed[0]
    assert not (out / "nompp.zarr").exists()
    argv = ["prep", str(src), "--out", str(out), "--patch-size", "32", "--mpp", "1.0", "--source-mpp", "0.5"]
    assert main([*argv, "--quiet"]) == 0
    capsys.readouterr()
    attrs = _store(out / "nompp.zarr").attrs["ips"]
    assert attrs["spacing"] == [0.5, 0.5]
    assert attrs["grids"]["default"]["level"] == 1  # 1.0 um/px: the 2x level of a 0.5 um/px scan
    assert attrs["provenance"]["mpp_override"] == {"mpp": 0.5, "file_mpp": None}


def test_source_mpp_replaces_the_files_and_is_recorded(tmp_path):
    src = write_pyramid_tiff(tmp_path / "wrong.tif", tissue_image(64, 64), levels=1, tile=32, mpp=0.5)
    with open_reader(src, mpp=0.25) as r:
        assert r.spacing == (0.25, 0.25)
        assert r.mpp_override == {"mpp": 0.25, "file_mpp": [pytest.approx(0.5), pytest.approx(0.5)]}
    assert main(["prep", str(src), "--out", str(tmp_path / "o"), "--source-mpp", "-1"]) == 2


# --- non-pyramidal slides ------------------------------------------------------------------------------


def test_non_pyramidal_tiff_warns_and_the_pyramid_is_built(tmp_path, capsys):
    img = tissue_image(1100, 900)
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(
        flat, img, tile=(64, 64), photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER"
    )
    pyramid = write_pyramid_tiff(tmp_path / "pyr.tif", img, levels=3, tile=64)
    out = tmp_path / "out"
    assert main(["prep", str(flat), str(pyramid), "--out", str(out), "--patch-size", "64", "--quiet"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(flat) in warnings[0] and "not pyramidal" in warnings[0]
    g = _store(out / "flat.zarr")
    assert len(g.attrs["ips"]["level_downsamples"]) >= 2  # the lower levels exist, built from level 0
    np.testing.assert_array_equal(g["1"][...], _store(out / "pyr.zarr")["1"][...])


def test_pyramid_warning_only_for_large_one_level_slides(tmp_path):
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, tissue_image(100, 80), photometric="rgb")
    with open_reader(small) as r:
        assert r.file_levels() == 1 and pyramid_warning(r, 512) is None  # no pyramid needed
        assert "not pyramidal (one level, 100 x 80 px)" in pyramid_warning(r, 64)
    img = tissue_image(150, 200)
    with open_reader(_dicom(tmp_path / "d", img, levels=2, tile=64)) as r:
        assert pyramid_warning(r, 64) is None
    with open_reader(_dicom(tmp_path / "d1", img, levels=1, tile=64)) as r:
        assert pyramid_warning(r, 64) is not None
