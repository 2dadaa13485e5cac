"""Writer and reader together: stores made by `data_prep.convert.convert_array` read back exactly."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from ips.data.zarr_source import ZarrPatchSource

convert = pytest.importorskip("data_prep.convert")
testing = pytest.importorskip("data_prep.testing")


def _options(**kw):
    base = dict(thumbnail=False, hash_source=False, threads=1, min_tissue=0.0)
    return convert.PrepOptions(**(base | kw))


def _check_against(source: ZarrPatchSource, array: np.ndarray, idx: np.ndarray | None = None) -> None:
    """Every patch equals `array[:, corner:corner + patch]` (the writer keeps patches inside the image)."""
    idx = np.arange(len(source)) if idx is None else idx
    got = source.read(idx).numpy()
    for k, i in enumerate(idx):
        corner = source.coords[i]
        sl = (slice(None),) + tuple(slice(int(c), int(c) + p) for c, p in zip(corner, source.patch_shape[1:]))
        np.testing.assert_array_equal(got[k], array[sl])


@pytest.fixture(scope="module")
def slide() -> np.ndarray:
    return np.moveaxis(testing.tissue_image(200, 260, seed=1), -1, 0).copy()  # (3, Y, X)


@pytest.mark.parametrize(("patch", "stride"), [(64, None), (16, None), (32, 16), (24, 40)])
@pytest.mark.parametrize("direct", [True, False])
def test_2d_level0(tmp_path, slide, patch, stride, direct):
    store = convert.convert_array(slide, tmp_path, "s", options=_options(patch_size=patch, stride=stride))
    source = ZarrPatchSource(store, direct_chunks=direct)
    assert len(source) > 0
    _check_against(source, slide)
    rng = np.random.default_rng(0)
    _check_against(source, slide, rng.integers(0, len(source), 40))


def test_2d_level1_grid(tmp_path, slide):
    store = convert.convert_array(slide, tmp_path, "s", options=_options(patch_size=16, level=1))
    source = ZarrPatchSource(store)
    assert source.info.level == 1
    _check_against(source, zarr.open_group(store, mode="r")["1"][...])


def test_3d_volume(tmp_path):
    rng = np.random.default_rng(2)
    volume = rng.integers(0, 4000, (1, 20, 40, 36)).astype(np.uint16)
    store = convert.convert_array(
        volume,
        tmp_path,
        "v",
        spacing=(2.0, 1.0, 1.0),
        options=_options(patch_size=8),
        mask=np.ones(volume.shape[1:], bool),
    )
    source = ZarrPatchSource(store)
    assert source.spatial_dims == 3 and source.patch_shape == (1, 8, 8, 8)
    assert source.read(np.array([0])).dtype.itemsize == 2
    _check_against(source, volume)
