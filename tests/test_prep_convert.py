"""Conversion: exact level 0, pyramid, store layout and attributes (docs/FORMAT.md), OME-NGFF validity,
masks and grids, volumes with their affine, reruns, and a conversion killed mid-write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from data_prep.convert import PrepOptions, convert_array, convert_file, prep_file, slide_id_of
from data_prep.grid import make_grid, tissue_fractions
from data_prep.pyramid import downsample2, plan_levels
from data_prep.testing import tissue_image, write_nifti, write_pyramid_tiff
from data_prep.writer import is_complete
from ips.config import ConfigError
from ips.errors import PrepError
from ips.format.names import COMPLETE_MARKER

REPO = Path(__file__).resolve().parents[1]


def open_store(path: Path) -> zarr.Group:
    return zarr.open_group(str(path), mode="r")


def level(group: zarr.Group, k: int) -> np.ndarray:
    return np.asarray(group[str(k)][...])


# --- the 2D pipeline on a generated pyramidal TIFF ---------------------------------------------------


@pytest.fixture
def pyramid_tiff(tmp_path):
    img = tissue_image(600, 700, box=(0.1, 0.15, 0.75, 0.6))
    return write_pyramid_tiff(tmp_path / "slide.tif", img, levels=3, tile=64), img


def test_pyramid_tiff_roundtrip(pyramid_tiff, tmp_path):
    path, img = pyramid_tiff
    out = tmp_path / "out"
    store = convert_file(path, out, options=PrepOptions(patch_size=64, threads=2))
    assert store == out / "slide.zarr" and is_complete(store)
    assert not list(out.glob(".*")), "no partial or temporary files left"
    assert (out / "slide.thumbnail.png").is_file()
    g = open_store(store)
    # level 0 is the source, exactly
    np.testing.assert_array_equal(level(g, 0), img.transpose(2, 0, 1))
    # each level is the 2x mean of the one above (floor size)
    attrs = g.attrs["ips"]
    assert attrs["level_downsamples"] == [[1, 1], [2, 2]]  # 700 // 2 = 350 <= 512
    prev = level(g, 0)
    for k in range(1, len(attrs["level_downsamples"])):
        cur = level(g, k)
        h, w = prev.shape[1] // 2 * 2, prev.shape[2] // 2 * 2
        np.testing.assert_array_equal(cur, downsample2(prev[:, :h, :w], (True, True)))
        prev = cur
    # chunks = patch, shards = 8 x 8 chunks, lossless zstd, fill = background
    a0 = g["0"]
    assert a0.chunks == (3, 64, 64) and a0.shards == (3, 512, 512)
    assert a0.fill_value == 255 and a0.metadata.dimension_names == ("c", "y", "x")
    assert [c.to_dict()["name"] for c in a0.compressors] == ["zstd"]
    assert a0.compressors[0].to_dict()["configuration"]["level"] == 1
    # attributes as in docs/FORMAT.md
    assert attrs["format_version"] == 3 and attrs["spatial_dims"] == 2 and attrs["channels"] == 3
    assert attrs["spacing"] == [0.5, 0.5] and attrs["background"] == 255
    prov = attrs["provenance"]
    assert prov["reader"] == "tifffile" and prov["source_size_bytes"] == path.stat().st_size
    assert len(prov["source_sha256"]) == 64 and prov["source_shape"] == [3, 600, 700]
    grid = attrs["grids"]["default"]
    assert grid["level"] == 0 and grid["patch_size"] == [64, 64] and grid["stride"] == [64, 64]
    assert grid["n_patches"] == g["grids/default/coords"].shape[0] > 0
    assert json.loads((store / COMPLETE_MARKER).read_text())["grids"] == ["default"]
    ome = g.attrs["ome"]
    assert ome["version"] == "0.5"
    assert ome["multiscales"][0]["datasets"][1]["coordinateTransformations"][0]["scale"] == [1.0, 1.0, 1.0]


def test_store_is_valid_ome_ngff(pyramid_tiff, tmp_path):
    from ome_zarr_models.v05 import Image

    store = convert_file(
        pyramid_tiff[0], tmp_path / "out", options=PrepOptions(patch_size=64, thumbnail=False)
    )
    image = Image.from_zarr(open_store(store))  # the strict pydantic models
    assert [d.path for d in image.ome_attributes.multiscales[0].datasets] == ["0", "1"]


def test_background_chunks_are_not_written(tmp_path):
    """A shard of pure background is no file at all, and reads back as the fill value."""
    img = np.full((3, 256, 512), 255, np.uint8)
    img[:, :, :256] = tissue_image(256, 256, box=(0, 0, 1, 1)).transpose(2, 0, 1)
    store = convert_array(img, tmp_path, "half", options=PrepOptions(patch_size=32, shard_chunks=8))
    shard_files = sorted(p.relative_to(store / "0") for p in (store / "0").rglob("*") if p.is_file())
    assert [str(p) for p in shard_files] == ["c/0/0/0", "zarr.json"]  # shard (0, 0, 1) is background
    np.testing.assert_array_equal(level(open_store(store), 0), img)


def test_grid_matches_mask_and_drops_edge_patches(tmp_path):
    img = tissue_image(200, 230, box=(0.25, 0.25, 0.75, 0.75)).transpose(2, 0, 1)
    store = convert_array(
        img, tmp_path, "box", options=PrepOptions(patch_size=40, min_tissue=0.5, thumbnail=False)
    )
    g = open_store(store)
    coords, tissue = g["grids/default/coords"][...], g["grids/default/tissue"][...]
    assert coords.dtype == np.int64 and coords.shape[1] == 2 and tissue.dtype == np.float32
    # every kept patch lies inside the image (edge patches are dropped, never padded)
    assert (coords >= 0).all() and (coords + 40 <= np.array([200, 230])).all()
    assert (tissue >= 0.5).all()
    # the stored tissue fraction is the share of mask pixels in the patch, recomputed by brute force
    mask = g["mask"][...].astype(bool)
    f = g.attrs["ips"]["mask"]["downsample"]
    full = np.kron(mask, np.ones(f, bool))
    for (r, c), t in zip(coords, tissue):
        want = full[r : r + 40, c : c + 40]
        assert abs(want.sum() / 1600 - t) < 1e-5
    # the box spans rows/cols 50..150 (and 57..172): only patches mostly inside it are kept
    assert coords[:, 0].min() >= 40 - 20 and coords[:, 0].max() <= 150 - 20


@pytest.mark.parametrize("scale", [(1.0, 1.0), (0.25, 0.5), (1 / 3, 0.7)])
def test_tissue_fractions_are_exact(scale):
    rng = np.random.default_rng(1)
    mask = rng.random((23, 31)) > 0.6
    starts = [np.arange(0, 60, 7), np.arange(3, 80, 11)]
    extent = (9.0, 13.0)
    got = tissue_fractions(mask, starts, extent, scale)
    # brute force on a 60x fine raster (all footprints are multiples of 1/60 of a mask pixel)
    k = 60
    fine = np.kron(mask, np.ones((k, k), np.float32))
    for i, r in enumerate(starts[0]):
        for j, c in enumerate(starts[1]):
            y0, y1 = int(round(r * scale[0] * k)), int(round((r + extent[0]) * scale[0] * k))
            x0, x1 = int(round(c * scale[1] * k)), int(round((c + extent[1]) * scale[1] * k))
            want = fine[y0:y1, x0:x1].sum() / ((y1 - y0) * (x1 - x0))
            assert abs(got[i, j] - want) < 0.02, (r, c)


def test_make_grid_stride_and_empty():
    mask = np.ones((10, 10), bool)
    coords, tissue = make_grid(mask, (4, 4), (40, 40), (1, 1), (16, 16), (8, 8), 0.5)
    assert coords[:5, 0].tolist() == [0, 0, 0, 0, 8] and len(coords) == 16  # starts 0, 8, 16, 24
    assert np.allclose(tissue, 1.0)
    coords, tissue = make_grid(mask, (4, 4), (10, 10), (1, 1), (16, 16), (16, 16), 0.0)
    assert coords.shape == (0, 2) and tissue.shape == (0,)


def test_grid_level_and_mpp(pyramid_tiff, tmp_path):
    path, _ = pyramid_tiff
    s1 = convert_file(path, tmp_path / "a", options=PrepOptions(patch_size=32, level=1, thumbnail=False))
    s2 = convert_file(path, tmp_path / "b", options=PrepOptions(patch_size=32, mpp=1.0, thumbnail=False))
    for s in (s1, s2):
        grid = open_store(s).attrs["ips"]["grids"]["default"]
        assert grid["level"] == 1 and grid["spacing"] == [1.0, 1.0]
        coords = open_store(s)["grids/default/coords"][...]
        assert (coords + 32 <= np.array([300, 350])).all()  # level-1 pixels
    with pytest.raises(PrepError, match="no level within 25% of 0.75"):
        convert_file(path, tmp_path / "c", options=PrepOptions(mpp=0.75))
    with pytest.raises(PrepError, match="level 12 does not exist"):
        convert_file(path, tmp_path / "d", options=PrepOptions(level=12))
    with pytest.raises(PrepError, match="no microns-per-pixel"):
        convert_array(np.zeros((1, 64, 64), np.uint8), tmp_path / "e", "x", options=PrepOptions(mpp=1.0))


def test_rerun_skips_adds_grids_and_overwrites(pyramid_tiff, tmp_path):
    path, _ = pyramid_tiff
    out = tmp_path / "out"
    first = prep_file(path, out, options=PrepOptions(patch_size=64, thumbnail=False))
    assert first.status == "done"
    marker = (out / "slide.zarr" / COMPLETE_MARKER).read_text()
    again = prep_file(path, out, options=PrepOptions(patch_size=64, thumbnail=False))
    assert again.status == "skipped" and (out / "slide.zarr" / COMPLETE_MARKER).read_text() == marker
    added = prep_file(path, out, options=PrepOptions(patch_size=32, stride=16, grid_name="fine"))
    assert added.status == "grid added" and added.n_patches > first.n_patches
    g = open_store(out / "slide.zarr")
    assert set(g.attrs["ips"]["grids"]) == {"default", "fine"}
    assert g.attrs["ips"]["grids"]["fine"]["stride"] == [16, 16]
    assert g["grids/fine/coords"].shape == (added.n_patches, 2)
    assert json.loads((out / "slide.zarr" / COMPLETE_MARKER).read_text())["grids"] == ["default", "fine"]
    redo = prep_file(path, out, options=PrepOptions(patch_size=128, overwrite=True, thumbnail=False))
    assert redo.status == "done"
    assert set(open_store(out / "slide.zarr").attrs["ips"]["grids"]) == {"default"}
    assert not list(out.glob(".*"))


def test_no_tissue_fails_and_leaves_nothing(tmp_path):
    blank = np.full((3, 128, 128), 255, np.uint8)
    with pytest.raises(PrepError, match="no tissue"):
        convert_array(blank, tmp_path, "blank")
    assert list(tmp_path.iterdir()) == []
    store = convert_array(blank, tmp_path, "blank", options=PrepOptions(allow_empty=True, patch_size=32))
    assert open_store(store)["grids/default/coords"].shape == (0, 2)


def test_convert_array_with_given_mask_at_lower_resolution(tmp_path):
    img = np.zeros((1, 64, 96), np.uint8)  # dark background, the mask alone decides
    mask = np.zeros((16, 24), bool)
    mask[4:8, 6:12] = True  # level-0 rows 16..32, cols 24..48
    store = convert_array(img, tmp_path, "m", mask=mask, options=PrepOptions(patch_size=8, min_tissue=1.0))
    g = open_store(store)
    assert g.attrs["ips"]["mask"] == {
        "downsample": [4, 4],
        "method": "given",
        "threshold": None,
        "level": None,
    }
    coords = g["grids/default/coords"][...]
    assert coords[:, 0].min() == 16 and coords[:, 0].max() == 24 and coords[:, 1].min() == 24
    assert len(coords) == 2 * 3
    with pytest.raises(ValueError, match="not the image"):
        convert_array(img, tmp_path, "bad", mask=np.ones((128, 96), bool))  # larger than the image
    with pytest.raises(ValueError, match="2 dims"):
        convert_array(img, tmp_path, "bad", mask=np.ones((4, 16, 24), bool))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.thumbnail.png", "m.zarr"]


def test_convert_array_3d(tmp_path):
    rng = np.random.default_rng(0)
    vol = np.zeros((2, 40, 64, 64), np.uint16)
    vol[:, 8:32, 16:48, 16:48] = rng.integers(1000, 3000, (2, 24, 32, 32))
    store = convert_array(
        vol,
        tmp_path,
        "vol",
        spacing=(4.0, 1.0, 1.0),
        options=PrepOptions(patch_size=8, min_tissue=0.5, pyramid_max_size=16),
    )
    g = open_store(store)
    np.testing.assert_array_equal(level(g, 0), vol)
    attrs = g.attrs["ips"]
    assert attrs["spatial_dims"] == 3 and g["0"].metadata.dimension_names == ("c", "z", "y", "x")
    assert attrs["level_downsamples"][:2] == [[1, 1, 1], [1, 2, 2]]  # z (4 um) is not halved at first
    coords = g["grids/default/coords"][...]
    assert coords.shape[1] == 3 and len(coords) > 0
    assert coords[:, 0].min() >= 8 - 4 and coords[:, 1].min() >= 16 - 4
    assert g["0"].chunks == (2, 32, 32, 32) and g["0"].dtype == np.uint16


def test_nifti_keeps_spacing_and_orientation(tmp_path):
    rng = np.random.default_rng(0)
    vol = np.zeros((48, 40, 20), np.int16)  # (I, J, K) = (x, y, z)
    vol[10:38, 8:32, 4:16] = rng.integers(200, 900, (28, 24, 12))
    theta = np.deg2rad(30)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.7, 0.9, 3.0])  # anisotropic, rotated, shifted
    affine[:3, 3] = [-12.5, 30.0, 7.25]
    path = write_nifti(tmp_path / "head.nii.gz", vol, affine)
    store = convert_file(path, tmp_path / "out", options=PrepOptions(patch_size=8, min_tissue=0.5))
    assert store.name == "head.zarr"
    g = open_store(store)
    attrs = g.attrs["ips"]
    np.testing.assert_array_equal(level(g, 0), vol.transpose(2, 1, 0)[None])  # (C, Z, Y, X)
    np.testing.assert_allclose(attrs["spacing"], [3000.0, 900.0, 700.0], rtol=1e-6)  # (z, y, x) um
    np.testing.assert_allclose(np.array(attrs["affine"]), affine, atol=1e-6)
    assert attrs["provenance"]["reader"] == "nifti"
    scale0 = g.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    np.testing.assert_allclose(scale0, [1.0, 3000.0, 900.0, 700.0], rtol=1e-6)
    from ome_zarr_models.v05 import Image

    Image.from_zarr(g)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"patch_size": 0}, "prep.patch_size"),
        ({"stride": -1}, "prep.stride"),
        ({"level": -1}, "prep.level"),
        ({"mpp": 0.0}, "prep.mpp"),
        ({"mpp": 0.5, "level": 1}, "prep.level"),
        ({"min_tissue": 1.5}, "prep.min_tissue"),
        ({"grid_name": "a/b"}, "prep.grid_name"),
        ({"codec": "lzw"}, "prep.codec"),
        ({"threads": -2}, "prep.threads"),
    ],
)
def test_prep_options_validation(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        PrepOptions(**kwargs)


@pytest.mark.parametrize(
    "name, sid",
    [
        ("a.ome.tiff", "a"),
        ("b.nii.gz", "b"),
        ("c.svs", "c"),
        ("TCGA-01.1234.svs", "TCGA-01.1234"),
        ("d.mrxs", "d"),
        ("e.foo", "e"),
        ("f", "f"),
        ("g.NDPI", "g"),
    ],
)
def test_slide_id(name, sid):
    assert slide_id_of(Path("/x") / name) == sid


def test_plan_levels():
    assert plan_levels((2967, 2220), (0.5, 0.5)) == [(1, 1), (2, 2), (4, 4), (8, 8)]
    assert plan_levels((100, 100), None, min_levels=3) == [(1, 1), (2, 2), (4, 4)]
    assert plan_levels((1, 4), None, max_size=1, min_levels=9) == [(1, 1)]  # never below 1 pixel
    assert plan_levels((8, 64, 64), (4.0, 1.0, 1.0), max_size=8)[1:4] == [(1, 2, 2), (1, 4, 4), (2, 8, 8)]


def test_downsample2_rounds_and_keeps_dtype():
    a = np.array([[[0, 1], [1, 1]]], np.uint8)
    assert downsample2(a, (True, True)).tolist() == [[[1]]]  # 0.75 rounds up
    f = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    assert downsample2(f, (True, True, True)).item() == pytest.approx(3.5)
    i = np.array([[[-3, -2]]], np.int16)
    assert downsample2(i, (False, True)).dtype == np.int16


# --- a conversion killed mid-write -------------------------------------------------------------------

SLOW_PREP = """
import sys, time
import data_prep.readers as readers
slow_read = readers.TiffReader._read
def _read(self, start, size):
    time.sleep(0.3)  # slow enough that the test can kill it between shards
    return slow_read(self, start, size)
readers.TiffReader._read = _read
from ips.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_conversion_leaves_no_complete_store_and_rerun_completes(tmp_path):
    img = tissue_image(1024, 1024, box=(0.1, 0.1, 0.9, 0.9))
    src = write_pyramid_tiff(tmp_path / "big.tif", img, levels=1, tile=64)
    out = tmp_path / "out"
    script = tmp_path / "slow_prep.py"
    script.write_text(SLOW_PREP)
    args = [str(src), "--out", str(out), "--patch-size", "64", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(script), "prep", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    partial = out / f".big.zarr.partial-{proc.pid}"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:  # wait until some level-0 shards exist
            if partial.is_dir() and any(p.is_file() for p in (partial / "0").rglob("c/*/*/*")):
                break
            assert proc.poll() is None, "the conversion finished before it could be killed"
            time.sleep(0.02)
        else:
            pytest.fail("no shard appeared within 60 s")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "big.zarr").exists(), "a killed conversion must not leave a complete-looking store"
    assert partial.is_dir() and not (partial / COMPLETE_MARKER).exists()

    from ips.cli.main import main

    assert main(["prep", *args]) == 0
    assert is_complete(out / "big.zarr") and not partial.exists()
    np.testing.assert_array_equal(level(open_store(out / "big.zarr"), 0), img.transpose(2, 0, 1))


# --- the real slide ----------------------------------------------------------------------------------


def test_real_svs_exact_level0_and_sensible_tissue(test_data, tmp_path):
    """Level 0 equals what OpenSlide (the reader used) and tifffile decode: the slide's JPEG tiles
    decode identically with both (libjpeg-turbo; measured 0 grey levels apart), so equality is exact.

    Tissue: on this H&E crop glass is grey-white (mean saturation ~0.01, brightness ~243), tissue is
    stained (saturation ~0.5). We check that every kept 256-px patch is stained (mean saturation > 0.15)
    and not blank (mean brightness < 235), that the glass corner (0, 0) is not a patch, and that the
    mask covers a share of the slide within the band measured by eye on the thumbnail (30-37%).
    """
    import openslide

    src = test_data / "cmu_small_region.svs"
    store = convert_file(src, tmp_path, options=PrepOptions(patch_size=256))
    g = open_store(store)
    lvl0 = level(g, 0)
    with openslide.OpenSlide(str(src)) as slide:
        ref = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))[..., :3].transpose(2, 0, 1)
    np.testing.assert_array_equal(lvl0, ref)
    np.testing.assert_array_equal(lvl0, tifffile.imread(src).transpose(2, 0, 1))
    attrs = g.attrs["ips"]
    assert attrs["spacing"] == [0.499, 0.499] and attrs["provenance"]["vendor"] == "aperio"
    assert attrs["provenance"]["source_sha256"].startswith("ed92d5a9")

    mask = g["mask"][...].astype(bool)
    assert 0.25 < mask.mean() < 0.45
    coords, tissue = g["grids/default/coords"][...], g["grids/default/tissue"][...]
    assert 20 <= len(coords) <= 50 and (tissue >= 0.5).all()
    assert not ((coords[:, 0] == 0) & (coords[:, 1] == 0)).any()
    for r, c in coords:
        patch = lvl0[:, r : r + 256, c : c + 256].astype(np.float32)
        hi, lo = patch.max(axis=0), patch.min(axis=0)
        sat = ((hi - lo) / np.maximum(hi, 1)).mean()
        assert sat > 0.15 and patch.mean() < 235, (r, c, sat, patch.mean())
    assert (tmp_path / "cmu_small_region.thumbnail.png").is_file()


@pytest.mark.parametrize("codec", ["zstd", "blosc-lz4", "none"])
@pytest.mark.parametrize("dtype, fill", [(np.uint8, 255), (np.uint16, 0)])
def test_shard_encoder_matches_zarr(tmp_path, codec, dtype, fill):
    """Shards written by the writer's own encoder read back through zarr exactly, edges and
    background chunks (left out of the shard) included."""
    from data_prep.writer import ShardEncoder, StoreWriter, make_compressor

    rng = np.random.default_rng(0)
    data = rng.integers(0, 200, (2, 150, 230)).astype(dtype)
    data[:, :64, :64] = fill  # one background chunk
    data[:, 128:, 128:] = fill  # a background shard at the corner
    writer = StoreWriter(tmp_path, "s")
    writer.begin()
    arr = writer.image_array(
        "0", data.shape, np.dtype(dtype), (32, 32), (128, 128), fill, make_compressor(codec)
    )
    enc = ShardEncoder(arr, writer.partial / "0")
    for y in range(0, 150, 128):
        for x in range(0, 230, 128):
            enc.write((y, x), data[:, y : y + 128, x : x + 128])
    np.testing.assert_array_equal(zarr.open_array(str(writer.partial / "0"), mode="r")[...], data)
    assert not (writer.partial / "0" / "c" / "0" / "1" / "1").exists()  # all background: no file
    with pytest.raises(ValueError, match="shard-aligned"):
        enc.write((1, 0), data[:, :10, :10])


def test_reads_are_shard_sized(tmp_path, monkeypatch):
    """Host memory does not grow with the image: the source is only ever read one shard at a time."""
    from data_prep.readers import ArrayReader

    sizes = []
    read = ArrayReader._read

    def spy(self, start, size):
        sizes.append(size)
        return read(self, start, size)

    monkeypatch.setattr(ArrayReader, "_read", spy)
    img = tissue_image(700, 900, box=(0, 0, 1, 1)).transpose(2, 0, 1)
    convert_array(img, tmp_path, "big", options=PrepOptions(patch_size=64, shard_chunks=2, thumbnail=False))
    assert len(sizes) == 6 * 8 and max(max(s) for s in sizes) == 128  # 128-px shards, never the image
