"""Every reader backend against one contract (`data_prep.testing.ReaderTests`), plus detection and the
one-line reasons for bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from data_prep.readers import (
    ArrayReader,
    NiftiReader,
    NpyReader,
    OpenSlideReader,
    TiffReader,
    detect_reader,
    open_reader,
)
from data_prep.testing import ReaderTests, tissue_image, write_nifti, write_pyramid_tiff
from ips.errors import PrepError

RNG = np.random.default_rng(0)


class TestArrayReader2D(ReaderTests):
    expected_spacing = (0.25, 0.5)

    def open(self, tmp_path):
        a = RNG.integers(0, 255, (3, 37, 53), dtype=np.uint8)
        return ArrayReader(a, spacing=(0.25, 0.5)), a


class TestArrayReader3D(ReaderTests):
    def open(self, tmp_path):
        a = RNG.normal(size=(2, 9, 17, 13)).astype(np.float32)
        return ArrayReader(a), a


class TestNpyReaderChannelsLast(ReaderTests):
    detected_as = "npy"

    def open(self, tmp_path):
        a = RNG.integers(0, 255, (31, 45, 3), dtype=np.uint8)
        np.save(tmp_path / "x.npy", a)
        return NpyReader(tmp_path / "x.npy"), a.transpose(2, 0, 1)


class TestNpyReaderVolume(ReaderTests):
    detected_as = "npy"

    def open(self, tmp_path):
        a = RNG.integers(-1000, 1000, (11, 20, 14), dtype=np.int16)
        np.save(tmp_path / "v.npy", a)
        return NpyReader(tmp_path / "v.npy"), a[None]


class TestTiffTiledPyramid(ReaderTests):
    """A tiled pyramidal RGB TIFF (SubIFDs), zlib, 0.5 um/px: level 0 is read."""

    detected_as = "tifffile"
    expected_spacing = (0.5, 0.5)

    def open(self, tmp_path):
        img = tissue_image(150, 200)
        path = write_pyramid_tiff(tmp_path / "p.tif", img, levels=3, tile=32)
        return TiffReader(path), img.transpose(2, 0, 1)


class TestTiffJpegTiles(ReaderTests):
    """JPEG tiles: compared with tifffile's own decode of the same file."""

    detected_as = "tifffile"
    expected_spacing = (0.5, 0.5)

    def open(self, tmp_path):
        path = write_pyramid_tiff(
            tmp_path / "j.tif", tissue_image(100, 140), levels=1, tile=32, compression="jpeg"
        )
        return TiffReader(path), tifffile.imread(path).transpose(2, 0, 1)


class TestTiffStripsGrey(ReaderTests):
    """Striped (not tiled) uint16, no resolution tags: spacing unknown."""

    detected_as = "tifffile"

    def open(self, tmp_path):
        a = RNG.integers(0, 65535, (70, 50), dtype=np.uint16)
        tifffile.imwrite(tmp_path / "g.tif", a, rowsperstrip=16, compression="zlib")
        return TiffReader(tmp_path / "g.tif"), a[None]


class TestTiffPlanarSeparate(ReaderTests):
    detected_as = "tifffile"

    def open(self, tmp_path):
        a = RNG.integers(0, 255, (3, 40, 60), dtype=np.uint8)
        tifffile.imwrite(tmp_path / "s.tif", a, planarconfig="separate", photometric="rgb", tile=(16, 16))
        return TiffReader(tmp_path / "s.tif"), a


class TestOmeTiffStack(ReaderTests):
    """OME-TIFF, axes ZCYX, tiled: a 3-channel volume with physical sizes (z 2 um, y/x 0.5 um)."""

    detected_as = "tifffile"
    expected_spacing = (2.0, 0.5, 0.5)

    def open(self, tmp_path):
        a = RNG.integers(0, 4000, (4, 3, 40, 48), dtype=np.uint16)  # (Z, C, Y, X)
        tifffile.imwrite(
            tmp_path / "o.ome.tif",
            a,
            ome=True,
            tile=(16, 16),
            metadata={"axes": "ZCYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "PhysicalSizeZ": 2.0},
        )
        return TiffReader(tmp_path / "o.ome.tif"), a.transpose(1, 0, 2, 3)


class TestTiffPageStack(ReaderTests):
    """A plain multi-page TIFF (one page per z) is a 1-channel volume."""

    detected_as = "tifffile"

    def open(self, tmp_path):
        a = RNG.integers(0, 255, (6, 30, 20), dtype=np.uint8)
        tifffile.imwrite(tmp_path / "stack.tif", a)
        return TiffReader(tmp_path / "stack.tif"), a[None]


class TestNifti(ReaderTests):
    """NIfTI-1, gzipped, anisotropic (0.8 x 0.6 x 2.5 mm): (i, j, k) -> (z=k, y=j, x=i)."""

    detected_as = "nifti"
    expected_spacing = (2500.0, 600.0, 800.0)

    def open(self, tmp_path):
        vol = RNG.integers(-500, 1500, (24, 18, 10), dtype=np.int16)  # (I, J, K)
        aff = np.diag([0.8, 0.6, 2.5, 1.0])
        path = write_nifti(tmp_path / "v.nii.gz", vol, aff)
        return NiftiReader(path), vol.transpose(2, 1, 0)[None]


class TestOpenSlideGenericTiff(ReaderTests):
    """OpenSlide forced on a tiled TIFF (auto-detection gives it to tifffile): same pixels."""

    detected_as = "tifffile"
    expected_spacing = (0.5, 0.5)

    def open(self, tmp_path):
        img = tissue_image(120, 90)
        path = write_pyramid_tiff(tmp_path / "g.tif", img, levels=2, tile=32)
        return OpenSlideReader(path), img.transpose(2, 0, 1)


class TestOpenSlideRealSvs(ReaderTests):
    """The real Aperio slide: OpenSlide's decode equals tifffile's (both libjpeg-turbo; measured 0 grey
    levels apart), so the contract holds exactly."""

    detected_as = "openslide"
    expected_spacing = (0.499, 0.499)

    @pytest.fixture
    def case(self, test_data):
        path = test_data / "cmu_small_region.svs"
        reader = OpenSlideReader(path)
        yield reader, tifffile.imread(path).transpose(2, 0, 1)
        reader.close()

    def test_vendor(self, case):
        assert case[0].vendor == "aperio"


# --- detection and bad files -------------------------------------------------------------------------


def test_open_reader_real_svs_is_openslide(test_data):
    with open_reader(test_data / "cmu_small_region.svs") as r:
        assert r.name == "openslide" and r.shape == (3, 2967, 2220)
    with open_reader(test_data / "cmu_small_region.svs", "tifffile") as r:  # --reader override
        assert r.name == "tifffile" and r.spacing == pytest.approx((0.499, 0.499))


def test_forced_reader_unknown_name(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 4), np.uint8))
    with pytest.raises(PrepError, match="unknown reader 'nope'"):
        open_reader(tmp_path / "a.npy", "nope")


def test_npy_is_detected_from_content_not_extension(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 4), np.uint8))
    (tmp_path / "a.npy").rename(tmp_path / "a.tif")
    assert detect_reader(tmp_path / "a.tif") == "npy"


def _truncated_tiff(tmp_path: Path) -> Path:
    path = write_pyramid_tiff(
        tmp_path / "t.tif", RNG.integers(0, 255, (128, 128, 3), dtype=np.uint8), levels=1, tile=32
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def _file(folder: Path, name: str, data: bytes) -> Path:
    (folder / name).write_bytes(data)
    return folder / name


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p / "missing.tif", "file not found"),
        (lambda p: p, "is a directory"),
        (lambda p: _file(p, "e.svs", b""), "empty file"),
        (lambda p: _file(p, "x.svs", b"hello, not a slide"), "unsupported format"),
        (lambda p: _file(p, "c.tif", b"II*\x00" + b"\xff" * 64), "corrupt or truncated TIFF"),
    ],
)
def test_bad_files_have_one_line_reasons(tmp_path, make, reason):
    with pytest.raises(PrepError, match=reason) as e:
        open_reader(make(tmp_path))
    assert "\n" not in str(e.value)


def test_truncated_tiff_fails_on_read(tmp_path):
    path = _truncated_tiff(tmp_path)
    with pytest.raises(PrepError, match="truncated TIFF"):
        with open_reader(path) as r:
            r.read_region((0, 0), r.spatial_shape)


def test_array_reader_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"\(C, Y, X\)"):
        ArrayReader(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="spacing"):
        ArrayReader(np.zeros((1, 4, 4)), spacing=(1.0,))
    with pytest.raises(ValueError, match="empty"):
        ArrayReader(np.zeros((1, 0, 4)))
