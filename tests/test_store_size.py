"""Smaller stores: `--store-from grid` (the store begins at the grid's level; everything users
see stays in the source's level-0 pixels) and lossy image codecs (JPEG, JPEG XL, WebP) for RGB slides."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from inference_fixtures import BINARY, make_store, tiny_cfg, write_checkpoint

from data_prep.cli import parse_shard  # noqa: F401 - the CLI module imports without the pipeline
from data_prep.convert import PrepOptions, convert_array, convert_file, prep_file
from data_prep.pyramid import downsample2
from data_prep.testing import texture_image, tissue_image, write_pyramid_tiff
from ips.cli.main import main
from ips.data.annotations import patch_labels
from ips.data.chunk_io import ChunkReader
from ips.data.store import open_store, verify_store
from ips.errors import ConfigError
from ips.format import image_codecs


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def level_px(store: Path, k: int) -> np.ndarray:
    return np.asarray(zarr.open_group(str(store), mode="r")[str(k)][...])


# --- --store-from grid -------------------------------------------------------------------------------


@pytest.fixture
def pyramid(tmp_path):
    """A lossless (zlib) 3-level pyramidal TIFF at 0.5 um/px; its level 1 is `[::2, ::2]` of level 0."""
    img = tissue_image(600, 700, box=(0.1, 0.15, 0.75, 0.6))
    return write_pyramid_tiff(tmp_path / "slide.tif", img, levels=3, tile=64), img


def test_store_from_grid_begins_at_the_source_level(pyramid, tmp_path):
    """Level 0 of the store is the source's level 1, pixel for pixel; the store says so; spacing and
    OME-NGFF scales are those of that level (checked by the strict ome-zarr-models)."""
    from ome_zarr_models.v05 import Image

    from data_prep.readers import open_reader

    path, _ = pyramid
    with open_reader(path) as reader:  # the TIFF's own levels, read as they are
        assert reader.native_levels() == [((1, 1), (600, 700)), ((2, 2), (300, 350)), ((4, 4), (150, 175))]
    opts = PrepOptions(patch_size=32, level=1, store_from="grid", thumbnail=False, threads=2)
    store = convert_file(path, tmp_path / "grid", options=opts)
    with tifffile.TiffFile(path) as tif:
        source_l1 = tif.series[0].levels[1].asarray().transpose(2, 0, 1)  # (3, 300, 350)
    np.testing.assert_array_equal(level_px(store, 0), source_l1[:, :300, :350])
    attrs = zarr.open_group(str(store), mode="r").attrs.asdict()
    ips, ome = attrs["ips"], attrs["ome"]
    assert ips["source_level"] == {
        "pyramid_level": 1,
        "downsample": [2, 2],
        "native_level": 1,
        "method": "source level 1",
    }
    assert ips["spacing"] == [1.0, 1.0] and ips["level_shapes"][0] == [3, 300, 350]
    assert ips["provenance"]["source_shape"] == [3, 600, 700] and ips["provenance"]["reader"] == "tifffile"
    assert ips["grids"]["default"]["level"] == 0 and ips["grids"]["default"]["spacing"] == [1.0, 1.0]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ome["multiscales"][0]["datasets"]]
    assert scales == [[1.0, 1.0, 1.0]]
    Image.from_zarr(zarr.open_group(str(store), mode="r"))
    opened = open_store(store)
    np.testing.assert_array_equal(opened.level_downsample(0), [2.0, 2.0])
    assert opened.source_spacing == [0.5, 0.5]
    assert verify_store(store) == []


def test_store_from_grid_has_the_same_grid_in_level0_pixels(pyramid, tmp_path):
    path, _ = pyramid
    common = {"patch_size": 32, "thumbnail": False, "threads": 1}
    full = open_store(convert_file(path, tmp_path / "a", options=PrepOptions(level=1, **common)))
    small = open_store(
        convert_file(path, tmp_path / "b", options=PrepOptions(level=1, store_from="grid", **common))
    )
    a, b = full.grid(), small.grid()
    assert (a.level, b.level) == (1, 0) and a.n_patches == b.n_patches > 0
    np.testing.assert_array_equal(
        full.coords() * full.level_downsample(1), small.coords() * small.level_downsample(0)
    )


def test_store_from_grid_without_a_native_level_is_the_level0_stores_level(tmp_path):
    """An in-memory image has no pyramid: the store's level 0 is built by the same 2x means, so it equals
    level 1 of a level-0 store exactly, and so does the rest of its pyramid. `--mpp` picks the level."""
    img = tissue_image(260, 300).transpose(2, 0, 1)
    common = {"patch_size": 16, "thumbnail": False, "threads": 2, "pyramid_max_size": 40}
    full = convert_array(img, tmp_path / "a", "s", spacing=(0.5, 0.5), options=PrepOptions(level=1, **common))
    small = convert_array(
        img,
        tmp_path / "b",
        "s",
        spacing=(0.5, 0.5),
        options=PrepOptions(mpp=1.0, store_from="grid", **common),
    )
    g_full, g_small = zarr.open_group(str(full), mode="r"), zarr.open_group(str(small), mode="r")
    assert g_small.attrs["ips"]["source_level"]["method"] == "1 x 2x mean of source level 0"
    assert len(g_small.attrs["ips"]["level_shapes"]) == len(g_full.attrs["ips"]["level_shapes"]) - 1
    for k in range(len(g_small.attrs["ips"]["level_shapes"])):
        np.testing.assert_array_equal(level_px(small, k), level_px(full, k + 1))
    np.testing.assert_array_equal(level_px(small, 0), downsample2(img, (True, True)))


def test_heatmap_geojson_and_annotations_are_in_source_level0_pixels(tmp_path):
    """The same grid in a level-0 store and in a `--store-from grid` store (same pixels there): `ips
    heatmap` writes the same GeoJSON and scores, and a QuPath annotation labels the same patches."""
    stores = {
        how: make_store(tmp_path / how, "s", size=(128, 96), patch=16, level=1, store_from=how)
        for how in ("level0", "grid")
    }
    ckpt = write_checkpoint(tmp_path / "model.pt", tiny_cfg(tasks=[BINARY], memory_size=4, iter_size=8))
    out = {}
    for how, store in stores.items():
        assert (
            main(["heatmap", "--checkpoint", str(ckpt), str(store), "--out", str(tmp_path / f"hm_{how}")])
            == 0
        )
        out[how] = tmp_path / f"hm_{how}" / "s"
    geo = {how: json.loads((d / "heatmap.geojson").read_text()) for how, d in out.items()}
    assert geo["grid"] == geo["level0"]  # polygons in level-0 px, measurements, selection
    first = geo["grid"]["features"][0]["geometry"]["coordinates"][0]
    assert first == [[0, 0], [32, 0], [32, 32], [0, 32], [0, 0]]  # 16 px at level 1 = 32 level-0 px
    scores = {how: zarr.open_group(str(d / "scores.zarr"), mode="r") for how, d in out.items()}
    np.testing.assert_array_equal(
        scores["grid"]["level0_coords"][...], scores["level0"]["level0_coords"][...]
    )
    # an annotation (QuPath GeoJSON, level-0 px) covering level-0 rows 0-47, cols 0-63
    ring = [[0, 0], [64, 0], [64, 48], [0, 48], [0, 0]]
    ann = tmp_path / "ann.geojson"
    ann.write_text(json.dumps({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}}))
    labels = {how: patch_labels(ann, store, "default").dense() for how, store in stores.items()}
    np.testing.assert_array_equal(labels["grid"], labels["level0"])
    # 3 patches (32 level-0 px) a row: row 0 inside, row 1 half inside, in the first two columns
    np.testing.assert_array_equal(labels["grid"], [1, 1, 0, 0.5, 0.5, 0, 0, 0, 0, 0, 0, 0])


def test_viewer_frame_is_the_source_level0(tmp_path):
    from ips.view.tiles import SlideImage

    store = open_store(make_store(tmp_path, "s", size=(128, 96), patch=16, level=1, store_from="grid"))
    image = SlideImage(store)
    assert image.downsamples[0] == (2.0, 2.0) and image.shapes[0] == (64, 48)


def test_rerun_and_added_grid_count_source_levels(pyramid, tmp_path):
    """`--level` counts the source's pyramid: a rerun with the same options skips, a grid at level 2 is
    the store's level 1, and level 0 (not in the store) fails naming --store-from."""
    path, _ = pyramid
    same = {"store_from": "grid", "thumbnail": False, "threads": 1, "pyramid_max_size": 200}
    opts = PrepOptions(patch_size=32, level=1, **same)
    assert prep_file(path, tmp_path, options=opts).status == "done"
    assert prep_file(path, tmp_path, options=opts).status == "skipped"
    coarse = PrepOptions(patch_size=16, level=2, grid_name="coarse", **same)
    result = prep_file(path, tmp_path, options=coarse)
    assert result.status == "grid added", result.reason
    assert open_store(tmp_path / "slide.zarr").grid("coarse").level == 1
    fine = PrepOptions(patch_size=16, level=0, grid_name="fine", **same)
    result = prep_file(path, tmp_path, options=fine)
    assert result.status == "failed" and "finer than the store's level 0" in result.reason
    other = PrepOptions(patch_size=32, level=1, **{**same, "store_from": "level0"})  # not what was made
    result = prep_file(path, tmp_path, options=other)
    assert result.status == "failed" and "store_from grid (this run: level0)" in result.reason


# --- lossy codecs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_or_texture(request, tmp_path_factory):
    """`(C, Y, X)` uint8: the real SVS region's top-left 1024 x 1024 when IPS_TEST_DATA is set, else a
    generated stained texture."""
    import os

    root = os.environ.get("IPS_TEST_DATA")
    if root and (Path(root) / "cmu_small_region.svs").is_file():
        import openslide

        with openslide.OpenSlide(str(Path(root) / "cmu_small_region.svs")) as slide:
            rgba = np.asarray(slide.read_region((0, 512), 0, (1024, 1024)))
        return rgba[..., :3].transpose(2, 0, 1).copy()
    return texture_image(512, 512).transpose(2, 0, 1).copy()


@pytest.mark.parametrize("codec, floor", [("jpeg", 40.0), ("jpegxl", 40.0), ("webp", 33.0)])
def test_lossy_round_trip_psnr_at_the_default_quality(real_or_texture, tmp_path, codec, floor):
    """JPEG and JPEG XL keep >= 40 dB at their default quality; WebP's lossy mode subsamples chroma
    (4:2:0) and stays near 34 dB on H&E at any quality (docs/BENCHMARKS.md)."""
    img = real_or_texture
    opts = PrepOptions(patch_size=128, codec=codec, thumbnail=False, threads=2, min_tissue=0.0)
    store = convert_array(img, tmp_path, "s", options=opts)
    assert psnr(level_px(store, 0), img) >= floor
    codecs = zarr.open_group(str(store), mode="r")["0"].metadata.to_dict()["codecs"][0]["configuration"][
        "codecs"
    ]
    assert [c["name"] for c in codecs] == ["transpose", image_codecs.NAMES[codec]]
    assert codecs[1]["configuration"] == {"level": image_codecs.DEFAULT_LEVEL[codec]}
    assert [c.to_dict()["name"] for c in zarr.open_group(str(store), mode="r")["mask"].compressors] == [
        "zstd"
    ]


@pytest.mark.parametrize("codec", ["jpeg", "jpegxl", "webp"])
def test_loader_reads_equal_zarrs_decoding(tmp_path, codec):
    """The direct shard reader decodes the image codecs itself: every box (chunk-aligned, straddling,
    past the edge) equals zarr's decoding of the same array; grey images too. `ips verify` passes."""
    rgb = texture_image(200, 232, seed=1).transpose(2, 0, 1)
    grey = rgb[:1].copy()
    for name, img in (("rgb", rgb), ("grey", grey))[: 1 if codec == "webp" else 2]:  # WebP: RGB only
        opts = PrepOptions(patch_size=32, codec=codec, codec_level=80, thumbnail=False, min_tissue=0.0)
        store = open_store(convert_array(img, tmp_path, name, options=opts))
        array = store.level(0)
        reader = ChunkReader.for_array(array, written=store.written_keys("0"))
        assert reader is not None and reader.layout.image.name == codec
        want = np.asarray(array[...])
        lo = np.array([[0, 0, 0], [0, 16, 40], [0, 190, 220], [0, 64, 96]])
        out = np.empty((len(lo), img.shape[0], 32, 32), np.uint8)
        reader.read_boxes(lo, (img.shape[0], 32, 32), out, np.arange(len(lo)))
        for (_, r, c), got in zip(lo, out):
            part = want[:, r : r + 32, c : c + 32]
            np.testing.assert_array_equal(got[:, : part.shape[1], : part.shape[2]], part)
            pad = array.fill_value  # outside the image: the background (255 for RGB, 0 for grey)
            assert (got[:, part.shape[1] :, :] == pad).all() and (got[:, :, part.shape[2] :] == pad).all()
        assert verify_store(store.location) == []


def test_lossy_codec_refuses_volumes_and_float_data(tmp_path):
    vol = np.zeros((1, 8, 64, 64), np.uint8)
    with pytest.raises(ConfigError, match=r"^--codec jpeg: lossy codecs take 2D uint8 images .* 3D uint8"):
        convert_array(vol, tmp_path, "v", options=PrepOptions(patch_size=16, codec="jpeg"))
    flt = np.zeros((3, 64, 64), np.float32)
    with pytest.raises(ConfigError, match="--codec webp: .*2D float32 image with 3 channels"):
        convert_array(flt, tmp_path, "f", options=PrepOptions(patch_size=16, codec="webp"))
    with pytest.raises(ConfigError, match="--codec webp: WebP codes RGB only"):
        convert_array(
            flt[:1].astype(np.uint8), tmp_path, "g", options=PrepOptions(patch_size=16, codec="webp")
        )
    assert not list(tmp_path.glob("*.zarr"))
    with pytest.raises(ConfigError, match="prep.codec_level: quality 1-100, got 0"):
        PrepOptions(codec="jpegxl", codec_level=0)
    with pytest.raises(ConfigError, match="prep.store_from: must be one of"):
        PrepOptions(store_from="level1")


def test_cli_options(tmp_path, capsys):
    """`--store-from grid` and `--codec jpeg --codec-level 85` reach the store."""
    img = tissue_image(300, 260)
    src = write_pyramid_tiff(tmp_path / "a.tif", img, levels=2, tile=64)
    rc = main(
        ["prep", str(src), "--out", str(tmp_path / "out"), "--patch-size", "32", "--level", "1"]
        + ["--store-from", "grid", "--codec", "jpeg", "--codec-level", "85", "--no-thumbnail"]
    )
    assert rc == 0
    attrs = zarr.open_group(str(tmp_path / "out" / "a.zarr"), mode="r").attrs["ips"]
    assert attrs["source_level"]["downsample"] == [2, 2]
    made = attrs["provenance"]["options"]
    assert (made["store_from"], made["codec"], made["codec_level"]) == ("grid", "jpeg", 85)
