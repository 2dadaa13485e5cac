"""The default pixel codec of `ips prep`: which codec it is, that it is lossless, that stores written
with the previous default (blosc-lz4) still open and read the same pixels, and the store size it gives
on the real Aperio slide at `--store-from grid --mpp 1.0`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from data_prep.options import DEFAULT_CODEC, PrepOptions
from data_prep.testing import tissue_image, write_pyramid_tiff
from ips.cli.main import main
from ips.data.store import open_store, verify_store
from ips.data.zarr_source import ZarrPatchSource


def pixel_codecs(store: Path, level: str = "0") -> list[dict]:
    """The codec chain inside the shards of one pyramid level, read from its zarr.json (no zarr)."""
    meta = json.loads((store / level / "zarr.json").read_text())
    (outer,) = meta["codecs"]
    assert outer["name"] == "sharding_indexed"
    return outer["configuration"]["codecs"]


def real_svs() -> Path:
    root = os.environ.get("IPS_TEST_DATA")
    svs = Path(root or "") / "cmu_small_region.svs"
    if not root or not svs.is_file():
        pytest.skip("IPS_TEST_DATA with cmu_small_region.svs is not set")
    return svs


def test_the_default_is_zstd_level_1():
    assert DEFAULT_CODEC == "zstd" and PrepOptions().codec == "zstd"


@pytest.mark.parametrize("codec", [None, "blosc-lz4"])
def test_default_and_previous_default_are_lossless(tmp_path, codec):
    """`ips prep` with no --codec writes zstd level 1 in every pyramid level; it and a store of the
    previous default (blosc-lz4) hold exactly the source pixels, read through zarr and through the
    patch reader."""
    img = tissue_image(768, 640, box=(0.1, 0.1, 0.9, 0.9))  # (Y, X, 3): level 0 and a 2x level
    src = write_pyramid_tiff(tmp_path / "s.tif", img, levels=1, tile=64, mpp=0.5)
    out = tmp_path / "out"
    flags = [] if codec is None else ["--codec", codec]
    argv = ["prep", str(src), "--out", str(out), "--patch-size", "64", "--no-thumbnail", "--quiet", *flags]
    assert main(argv) == 0
    store = out / "s.zarr"
    inner = pixel_codecs(store)
    if codec is None:
        assert inner == [
            {"name": "bytes"},
            {"name": "zstd", "configuration": {"level": 1, "checksum": False}},
        ]
        assert pixel_codecs(store, "1") == inner
    else:
        assert inner[-1]["name"] == "blosc" and inner[-1]["configuration"]["cname"] == "lz4"
    source = tifffile.imread(src)  # the TIFF decoded by another library: (Y, X, 3)
    level0 = zarr.open_array(str(store / "0"), mode="r")[...]  # (3, Y, X)
    np.testing.assert_array_equal(level0, source.transpose(2, 0, 1))
    coords = open_store(store).coords("default")
    patches = ZarrPatchSource(store).read(np.arange(len(coords))).numpy()  # (N, 3, 64, 64)
    for patch, (r, c) in zip(patches, coords):
        np.testing.assert_array_equal(patch, source[r : r + 64, c : c + 64].transpose(2, 0, 1))
    assert verify_store(store) == []


def test_real_svs_grid_store_is_within_1_5x_of_the_svs(tmp_path):
    """The default codec on the real 0.5 um/px Aperio crop, stored from the 1.0 um/px grid: the whole
    store (pyramid, mask, grid, metadata) is at most 1.5x the SVS file."""
    svs = real_svs()
    out = tmp_path / "out"
    argv = ["prep", str(svs), "--out", str(out), "--store-from", "grid", "--mpp", "1.0", "--quiet"]
    assert main([*argv, "--no-thumbnail"]) == 0
    store = out / "cmu_small_region.zarr"
    size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    assert pixel_codecs(store)[-1]["name"] == "zstd"
    assert size <= 1.5 * svs.stat().st_size, size / svs.stat().st_size


def test_real_svs_level0_default_store_equals_the_decoded_svs(tmp_path):
    """Lossless on real JPEG tiles: the default store's level 0 equals the SVS decoded by tifffile."""
    svs = real_svs()
    out = tmp_path / "out"
    assert main(["prep", str(svs), "--out", str(out), "--no-thumbnail", "--quiet"]) == 0
    level0 = zarr.open_array(str(out / "cmu_small_region.zarr" / "0"), mode="r")[...]
    source = tifffile.imread(svs)  # (Y, X, 3)
    np.testing.assert_array_equal(level0, source.transpose(2, 0, 1))


def two_x_mean(a: np.ndarray) -> np.ndarray:
    """Independent 2x mean of a `(C, Y, X)` uint8 image (even sides), rounded half up."""
    c, h, w = a.shape
    s = a.astype(np.int64).reshape(c, h // 2, 2, w // 2, 2).sum(axis=(2, 4))
    return ((s + 2) // 4).astype(np.uint8)


def test_level_reader_reads_the_source_in_pieces_of_the_block_size():
    """`--store-from grid` four times below level 0: a store block is read from the source in pieces no
    larger than the block, and the pixels are the repeated 2x means of the source."""
    from data_prep.levels import LevelReader
    from data_prep.readers import ArrayReader

    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, (3, 512, 384), dtype=np.uint8)
    reader = ArrayReader(src, spacing=(0.25, 0.25))
    sizes = []
    read = reader.read_level_region

    def spy(level, start, size):
        sizes.append(tuple(size))
        return read(level, start, size)

    reader.read_level_region = spy
    level = LevelReader(reader, [(1, 1), (2, 2), (4, 4)], 2)  # (3, 128, 96)
    block = level.read_region((16, 8), (64, 40))
    expect = two_x_mean(two_x_mean(src))[:, 16:80, 8:48]
    np.testing.assert_array_equal(block, expect)
    assert sizes == [(64, 40)] * 16  # 4 x 4 pieces of the block size, not one (256, 160) read
