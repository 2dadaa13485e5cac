"""Store access: clear one-line errors for every way a store can be wrong."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr
from loader_fixtures import random_image, write_store

from ips.data.store import StoreError, open_store
from ips.data.zarr_source import FeatureSource, ZarrPatchSource
from ips.format import names as sf


@pytest.fixture
def store(tmp_path):
    return write_store(tmp_path / "s.zarr", random_image((3, 16, 24)), patch_size=8, grid_name="g8")


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_open_reads_attributes(store):
    s = open_store(store)
    assert s.spatial_dims == 2 and s.channels == 3 and s.background == 255
    assert list(s.grids) == ["g8"]
    g = s.grid("g8")
    assert g.patch_size == (8, 8) and g.stride == (8, 8) and g.level == 0 and g.n_patches == 6
    assert s.coords("g8").dtype == np.int64 and s.coords("g8").shape == (6, 2)


def test_missing_store(tmp_path):
    with pytest.raises(StoreError) as e:
        ZarrPatchSource(tmp_path / "nope.zarr")
    msg = _one_line(e)
    assert "nope.zarr" in msg and "does not exist" in msg


def test_missing_store_points_at_partial(tmp_path):
    (tmp_path / f".s.zarr{sf.PARTIAL_SUFFIX}").mkdir()
    with pytest.raises(StoreError, match="partial conversion"):
        open_store(tmp_path / "s.zarr")


def test_incomplete_store(store):
    (store / sf.COMPLETE_MARKER).unlink()
    with pytest.raises(StoreError) as e:
        ZarrPatchSource(store, grid="g8")
    msg = _one_line(e)
    assert str(store) in msg and "incomplete" in msg and sf.COMPLETE_MARKER in msg


def test_unknown_grid_lists_valid_names(store):
    with pytest.raises(StoreError) as e:
        ZarrPatchSource(store, grid="default")
    msg = _one_line(e)
    assert str(store) in msg and "'default'" in msg and "g8" in msg


def test_unknown_feature_set(store):
    with pytest.raises(StoreError) as e:
        FeatureSource(store, "uni")
    msg = _one_line(e)
    assert "'uni'" in msg and "ips embed" in msg


def test_not_a_store(tmp_path):
    (tmp_path / "x.zarr").mkdir()
    (tmp_path / "x.zarr" / sf.COMPLETE_MARKER).write_text("{}")
    with pytest.raises(StoreError, match="not a zarr group"):
        open_store(tmp_path / "x.zarr")
    (tmp_path / "f.zarr").write_text("")
    with pytest.raises(StoreError, match="not a zarr store"):
        open_store(tmp_path / "f.zarr")


def test_not_an_ips_store(tmp_path):
    zarr.open_group(tmp_path / "z.zarr", mode="w")
    (tmp_path / "z.zarr" / sf.COMPLETE_MARKER).write_text("{}")
    with pytest.raises(StoreError, match="not an ips store"):
        open_store(tmp_path / "z.zarr")


def test_wrong_format_version(store):
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"][sf.IPS_ATTR]["format_version"] = 99
    (store / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="format_version 99"):
        open_store(store)


def test_missing_coords_array(store):
    shutil.rmtree(store / sf.GRIDS_GROUP / "g8" / sf.COORDS_ARRAY)
    with pytest.raises(StoreError, match="array 'grids/g8/coords' chunk 'c/0/0': missing"):
        ZarrPatchSource(store, grid="g8")


def test_store_object(store):
    """Anything zarr accepts: here a zarr Store object (the completion check goes through zarr)."""
    s = open_store(zarr.storage.LocalStore(store, read_only=True))
    assert s.grid("g8").n_patches == 6
    (store / sf.COMPLETE_MARKER).unlink()
    with pytest.raises(StoreError, match="incomplete"):
        open_store(zarr.storage.LocalStore(store, read_only=True))


def test_store_object_source_reads(store):
    """A source over a non-path store uses the same direct chunk reads through the zarr store API."""
    by_path = ZarrPatchSource(store, grid="g8")
    by_store = ZarrPatchSource(zarr.storage.LocalStore(store, read_only=True), grid="g8")
    idx = np.array([5, 0, 3])
    assert (by_path.read(idx) == by_store.read(idx)).all()


def test_grid_not_listed_in_marker_is_incomplete(store):
    """A grid added to a complete store counts only once the marker lists it (FORMAT.md)."""
    marker = json.loads((store / sf.COMPLETE_MARKER).read_text())
    marker["grids"] = []
    (store / sf.COMPLETE_MARKER).write_text(json.dumps(marker))
    with pytest.raises(StoreError) as e:
        ZarrPatchSource(store, grid="g8")
    msg = _one_line(e)
    assert "'g8'" in msg and "incomplete" in msg
