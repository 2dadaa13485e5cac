"""Store integrity: a lost, truncated or damaged chunk is an error that names the store, the array and the
chunk, never background read in silence; `ips verify` checks every checksum. A damaged marker is a damaged
store (never an unchecked one); no reader reads outside a store; metadata must be what prep recorded."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from data_prep.convert import PrepOptions, convert_array
from data_prep.testing import tissue_image
from ips.cli.main import main
from ips.data.store import UnverifiedStoreWarning, open_store, verify_store
from ips.data.zarr_source import RegionReader, ZarrPatchSource
from ips.errors import StoreError
from ips.format import names as sf
from ips.format.store import read_marker


@pytest.fixture(params=["blosc-lz4", "zstd"])
def store(tmp_path, request):
    """A 256 x 256 slide, 32-px patches in 64-px chunks, 2 x 2 chunks per shard: 4 level-0 shards."""
    img = tissue_image(256, 256, box=(0.0, 0.0, 1.0, 1.0)).transpose(2, 0, 1)
    opts = PrepOptions(
        patch_size=32, shard_chunks=2, min_tissue=0.0, thumbnail=False, hash_source=False, codec=request.param
    )
    return convert_array(img, tmp_path, "s", options=opts, background=255)


def shard(store, key="c/0/1/1"):
    return store / "0" / key


def test_marker_records_every_written_file(store):
    marker = read_marker(store)
    assert marker.format_version == sf.FORMAT_VERSION == 3
    raw = json.loads((store / sf.COMPLETE_MARKER).read_text())
    assert raw["checksum"] == "crc32c"
    level0 = marker.arrays["0"]
    assert sorted(level0) == ["c/0/0/0", "c/0/0/1", "c/0/1/0", "c/0/1/1"]
    assert all(level0[k][0] == shard(store, k).stat().st_size for k in level0)
    assert "grids/default/coords" in marker.arrays and "mask" in marker.arrays
    assert verify_store(store) == []


def test_deleted_shard_read_fails_naming_it(store):
    source = ZarrPatchSource(store, read_threads=1)
    shard(store).unlink()
    with pytest.raises(StoreError, match=r"s\.zarr: array '0' shard 'c/0/1/1': missing"):
        source.read(np.arange(len(source)))
    with pytest.raises(StoreError, match="array '0' chunk 'c/0/1/1': missing"):
        open_store(store)


def test_deleted_coords_chunk_fails_open(store):
    (store / "grids" / "default" / "coords" / "c" / "0" / "0").unlink()
    with pytest.raises(StoreError, match=r"s\.zarr: array 'grids/default/coords' chunk 'c/0/0': missing"):
        open_store(store)


def test_damaged_coords_chunk_fails_read(store):
    opened = open_store(store)
    path = store / "grids" / "default" / "coords" / "c" / "0" / "0"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))  # same size: passes the stat check, not the checksum
    with pytest.raises(StoreError, match="array 'grids/default/coords' chunk 'c/0/0'.*damaged"):
        opened.coords()


def test_truncated_shard_is_a_clear_error(store):
    source = ZarrPatchSource(store, read_threads=1)
    path = shard(store)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(StoreError, match="shard 'c/0/1/1'.*(truncated|bytes)"):
        source.read(np.arange(len(source)))
    with pytest.raises(StoreError, match="array '0' chunk 'c/0/1/1'.*truncated"):
        open_store(store)


def test_corrupt_index_and_undecodable_chunk_name_the_chunk(store):
    source = ZarrPatchSource(store, read_threads=1)
    path = shard(store)
    good = path.read_bytes()
    bad = bytearray(good)
    bad[-10] ^= 0xFF  # inside the index
    path.write_bytes(bytes(bad))
    with pytest.raises(StoreError, match="shard 'c/0/1/1'.*checksum"):
        source.read(np.arange(len(source)))
    path.write_bytes(good)
    source = ZarrPatchSource(store, read_threads=1)
    bad = bytearray(good)
    bad[:16] = bytes(16)  # the first chunk's codec header
    path.write_bytes(bytes(bad))
    with pytest.raises(StoreError, match=r"chunk \(0, \d+, \d+\) in shard 'c/0/1/1': does not decode"):
        source.read(np.arange(len(source)))


def test_flipped_bytes_verify_exits_1_naming_them(store, capsys):
    assert main(["verify", str(store)]) == 0
    path = shard(store, "c/0/0/1")
    data = bytearray(path.read_bytes())
    for i in range(100, 2100):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(store)]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "DAMAGED" in ln]
    assert len(lines) == 1 and "array '0' chunk 'c/0/0/1'" in lines[0] and "crc32c" in lines[0]


def test_verify_missing_store_and_bad_usage(tmp_path, store, capsys):
    assert main(["verify", str(store), str(tmp_path / "nope.zarr")]) == 1
    assert "nope.zarr: store does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["verify"])
    assert e.value.code == 2


def test_background_is_not_damage(tmp_path):
    """Unwritten (background) chunks are not in the record and read as the fill value."""
    img = np.full((3, 256, 256), 255, np.uint8)
    img[:, :64, :64] = 17
    opts = PrepOptions(patch_size=32, shard_chunks=2, min_tissue=0.0, thumbnail=False, hash_source=False)
    s = convert_array(img, tmp_path, "bg", options=opts, background=255, mask=np.ones((8, 8), bool))
    assert sorted(read_marker(s).arrays["0"]) == ["c/0/0/0"]
    source = ZarrPatchSource(s)
    out = source.read(np.arange(len(source))).numpy()
    assert (out[0] == 17).all() and (out[-1] == 255).all()


def test_format1_store_opens_with_one_warning_and_is_unverifiable(store, capsys):
    import zarr

    group = zarr.open_group(str(store), mode="r+")
    attrs = dict(group.attrs["ips"])
    attrs["format_version"] = 1
    group.attrs["ips"] = attrs
    marker = json.loads((store / sf.COMPLETE_MARKER).read_text())
    (store / sf.COMPLETE_MARKER).write_text(
        json.dumps({k: marker[k] for k in ("tool_version", "completed", "grids")})
    )
    with pytest.warns(UnverifiedStoreWarning, match="cannot be detected.*--overwrite"):
        open_store(store)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_store(store)  # once per store
    assert main(["verify", str(store)]) == 1
    assert "cannot be verified" in capsys.readouterr().err


def test_unknown_format_version_is_refused(store):
    import zarr

    group = zarr.open_group(str(store), mode="r+")
    group.attrs["ips"] = {**dict(group.attrs["ips"]), "format_version": 99}
    with pytest.raises(StoreError, match="format_version 99.*--overwrite"):
        open_store(store)


def test_copied_store_still_verifies(store, tmp_path):
    copy = tmp_path / "copy" / "s.zarr"
    shutil.copytree(store, copy)
    assert verify_store(copy) == []


# --- a damaged marker never switches checking off -------------------------------------------------------


def _marker_doc(store) -> dict:
    return json.loads((store / sf.COMPLETE_MARKER).read_text())


def _set_attrs_version(store, version: int) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["ips"]["format_version"] = version
    (store / "zarr.json").write_text(json.dumps(meta))


def _as_format2(store) -> None:
    """What a format-2 prep wrote: the same marker without the metadata record."""
    doc = _marker_doc(store)
    doc["format_version"] = 2
    del doc["metadata"]
    (store / sf.COMPLETE_MARKER).write_text(json.dumps(doc))
    _set_attrs_version(store, 2)


DAMAGED_MARKERS = {
    "not json": lambda doc: b"{",
    "empty file": lambda doc: b"",
    "a list": lambda doc: b"[]",
    "empty object": lambda doc: b"{}",
    "no arrays": lambda doc: json.dumps({k: v for k, v in doc.items() if k != "arrays"}).encode(),
    "no metadata": lambda doc: json.dumps({k: v for k, v in doc.items() if k != "metadata"}).encode(),
    "no checksum name": lambda doc: json.dumps({k: v for k, v in doc.items() if k != "checksum"}).encode(),
    "bad record": lambda doc: json.dumps(
        {**doc, "arrays": {**doc["arrays"], "0": {"c/0/0/0": [1]}}}
    ).encode(),
    "version as text": lambda doc: json.dumps({**doc, "format_version": "3"}).encode(),
    "level 0 dropped": lambda doc: json.dumps(
        {**doc, "arrays": {k: v for k, v in doc["arrays"].items() if k != "0"}}
    ).encode(),
    "format 1 claimed": lambda doc: json.dumps(
        {k: doc[k] for k in ("tool_version", "completed", "grids")}
    ).encode(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGED_MARKERS))
def test_a_damaged_marker_is_refused_by_every_reader(store, damage, capsys):
    shard(store).unlink()  # lost data that a lenient reader would read as background
    marker = store / sf.COMPLETE_MARKER
    marker.write_bytes(DAMAGED_MARKERS[damage](_marker_doc(store)))
    with pytest.raises(StoreError) as e:
        open_store(store)
    line = str(e.value)
    assert "\n" not in line and str(marker) in line and "damaged completion marker" in line
    with pytest.raises(StoreError, match="damaged completion marker"):
        ZarrPatchSource(store)
    capsys.readouterr()
    assert main(["verify", str(store)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "DAMAGED" in err[0] and "damaged completion marker" in err[0]


def test_only_a_genuine_format1_store_opens_unchecked(store):
    doc = _marker_doc(store)
    legacy = json.dumps({k: doc[k] for k in ("tool_version", "completed", "grids")})
    (store / sf.COMPLETE_MARKER).write_text(legacy)
    with pytest.raises(StoreError, match="damaged completion marker.*format 1.*attributes say 3"):
        open_store(store)  # attributes of format 3, a marker of format 1: damage, not a legacy store
    _set_attrs_version(store, 1)
    with pytest.warns(UnverifiedStoreWarning):
        open_store(store)
    # and a format-2 marker on a store whose attributes say 3 is refused the same way
    _set_attrs_version(store, 3)
    doc["format_version"] = 2
    (store / sf.COMPLETE_MARKER).write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="format 2, the store's attributes say 3"):
        open_store(store)


def test_a_format2_store_still_opens_and_verifies(store):
    _as_format2(store)
    source = ZarrPatchSource(store)
    assert len(source) == 64 and verify_store(store) == []
    shard(store).unlink()
    with pytest.raises(StoreError, match="chunk 'c/0/1/1': missing"):
        open_store(store)


# --- no reads outside a store ---------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(range(256)) * 64)
    return secret


def test_a_recorded_chunk_that_is_a_link_is_refused(store, outside, capsys):
    source = ZarrPatchSource(store, read_threads=1)  # opened before the swap
    shutil.copy(shard(store), outside)  # the same bytes, so size and checksum would pass
    shard(store).unlink()
    shard(store).symlink_to(outside)
    with pytest.raises(StoreError, match=r"shard 'c/0/1/1': a symbolic link"):
        source.read(np.arange(len(source)))
    with pytest.raises(StoreError, match=r"array '0' chunk 'c/0/1/1': a symbolic link"):
        open_store(store)
    assert main(["verify", str(store)]) == 1
    assert "a symbolic link" in capsys.readouterr().err


def test_a_link_with_its_array_dropped_from_the_marker_is_refused(store, outside):
    shard(store).unlink()
    shard(store).symlink_to(outside)
    doc = _marker_doc(store)
    del doc["arrays"]["0"], doc["metadata"]["0"]
    (store / sf.COMPLETE_MARKER).write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="array '0' is not recorded"):
        open_store(store)
    assert "array '0' is not recorded" in verify_store(store)[0]


def test_a_folder_resolving_outside_is_refused(store, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.move(store / "0" / "c" / "0" / "1", moved)
    (store / "0" / "c" / "0" / "1").symlink_to(moved, target_is_directory=True)
    with pytest.raises(StoreError, match="chunk 'c/0/1/0': in a folder that resolves outside the store"):
        open_store(store)
    problems = verify_store(store)
    assert problems and "resolves outside the store" in problems[0]


def test_an_unrecorded_link_is_never_read_and_verify_names_it(tmp_path, outside):
    """A key the marker does not record is background for every reader, whatever the file there is."""
    img = np.full((3, 256, 256), 255, np.uint8)
    img[:, :64, :64] = 17
    opts = PrepOptions(patch_size=32, shard_chunks=2, min_tissue=0.0, thumbnail=False, hash_source=False)
    s = convert_array(img, tmp_path, "bg", options=opts, background=255, mask=np.ones((8, 8), bool))
    link = s / "0" / "c" / "0" / "1" / "1"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    source = ZarrPatchSource(s, read_threads=1)
    out = source.read(np.arange(len(source))).numpy()
    assert (out[0] == 17).all() and (out[-1] == 255).all()  # background where the marker says so
    problems = verify_store(s)
    assert len(problems) == 1 and "'0/c/0/1/1': a symbolic link" in problems[0]


def test_zarr_reads_and_unrecorded_stores_refuse_links_too(store, outside):
    """zarr's own reads (the viewer's, small arrays) and a format-1 store's reads go through the guard."""
    shutil.copy(shard(store), outside)
    shard(store).unlink()
    shard(store).symlink_to(outside)
    doc = _marker_doc(store)
    (store / sf.COMPLETE_MARKER).write_text(
        json.dumps({k: doc[k] for k in ("tool_version", "completed", "grids")})
    )
    _set_attrs_version(store, 1)
    with pytest.warns(UnverifiedStoreWarning):
        opened = open_store(store)
    with pytest.raises(StoreError, match="a symbolic link"):
        np.asarray(opened.level(0)[...])
    source = ZarrPatchSource(store, read_threads=1)
    with pytest.raises(StoreError, match="shard 'c/0/1/1': a symbolic link"):
        source.read(np.arange(len(source)))
    with pytest.raises(StoreError, match="a symbolic link"):
        RegionReader(opened, 0).read((100, 100), (50, 50))


def test_a_store_reached_through_a_link_is_fine(store, tmp_path):
    alias = tmp_path / "alias.zarr"
    alias.symlink_to(store, target_is_directory=True)
    source = ZarrPatchSource(alias)
    assert len(source.read(np.arange(len(source)))) == 64 and verify_store(alias) == []


def test_region_reader_reads_what_zarr_reads(store):
    opened = open_store(store)
    reader = RegionReader(opened, 0)
    want = np.full((3, 40, 50), 255, np.uint8)  # the background outside the level
    want[:, :26, :] = np.asarray(opened.level(0)[:, 230:256, 10:60])  # level 0 is 256 x 256
    np.testing.assert_array_equal(reader.read((230, 10), (40, 50)), want)
    assert not (want == 255).all()


# --- verify checks metadata, one line per store, and goes on ----------------------------------------------


def _set_level_meta(store, key: str, value) -> None:
    path = store / "0" / "zarr.json"
    meta = json.loads(path.read_text())
    meta[key] = value
    path.write_text(json.dumps(meta))


def test_a_deleted_level_zarr_json_is_found(store):
    (store / "0" / "zarr.json").unlink()
    problems = verify_store(store)
    assert len(problems) == 1 and "'0' zarr.json: missing" in problems[0]
    with pytest.raises(StoreError, match="missing array '0'"):
        ZarrPatchSource(store)


def test_a_grid_zarr_json_deleted_or_changed_is_found(store):
    meta = store / "grids" / "default" / "zarr.json"
    doc = json.loads(meta.read_text())
    meta.unlink()
    assert "'grids/default' zarr.json: missing" in verify_store(store)[0]
    doc["attributes"]["stride"] = [16, 16]
    meta.write_text(json.dumps(doc))
    assert "'grids/default' zarr.json: attributes.stride[0] 16, recorded 32" in verify_store(store)[0]


def test_grid_attributes_changed_in_the_root_are_refused(store):
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["ips"]["grids"]["default"]["stride"] = [16, 16]
    (store / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="grid 'default': its attributes in zarr.json differ"):
        ZarrPatchSource(store)
    assert "grid 'default'" in verify_store(store)[0]


@pytest.mark.parametrize("fmt", [3, 2])
def test_a_level_turned_float64_is_refused(store, fmt):
    if fmt == 2:
        _as_format2(store)  # no metadata record: the attributes' dtype still says uint8
    _set_level_meta(store, "data_type", "float64")
    with pytest.raises(StoreError, match=r"array '0' zarr.json: data_type .*float64.*uint8"):
        ZarrPatchSource(store)
    problems = verify_store(store)
    assert len(problems) == 1 and "'0' zarr.json: data_type" in problems[0]


def test_changed_shape_and_codecs_are_found(store):
    _set_level_meta(store, "shape", [3, 256, 512])
    assert "'0' zarr.json: shape[2] 512, recorded 256" in verify_store(store)[0]
    _set_level_meta(store, "shape", [3, 256, 256])
    path = store / "0" / "zarr.json"
    path.write_text(
        path.read_text().replace('"clevel": 5', '"clevel": 9').replace('"level": 1', '"level": 9')
    )
    problems = verify_store(store)
    assert len(problems) == 1 and "codecs[0].configuration.codecs[1].configuration" in problems[0]


def test_verify_gives_one_line_per_store_and_goes_on(store, tmp_path, capsys):
    """A root zarr.json of `{`, a level zarr.json of garbage, several damaged files: one line each store,
    and every store after them is still checked."""
    broken = tmp_path / "b" / "broken.zarr"
    garbage = tmp_path / "g" / "garbage.zarr"
    many = tmp_path / "m" / "many.zarr"
    for copy in (broken, garbage, many):
        shutil.copytree(store, copy)
    (broken / "zarr.json").write_text("{")
    (garbage / "0" / "zarr.json").write_bytes(b"\xff\xfe not json")
    for key in ("c/0/0/0", "c/0/0/1", "c/0/1/0"):
        (many / "0" / key).unlink()
    with pytest.raises(StoreError, match=r"broken\.zarr/zarr\.json: damaged"):
        open_store(broken)
    capsys.readouterr()
    assert main(["verify", str(broken), str(garbage), str(many), str(store)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"ok {store}"]
    lines = err.splitlines()
    assert len(lines) == 4 and "3 of 4 stores" in lines[3]
    assert "broken.zarr/zarr.json: damaged" in lines[0]
    assert "garbage.zarr" in lines[1] and "'0'" in lines[1]
    assert "many.zarr" in lines[2] and "missing" in lines[2]


def test_a_grid_added_to_a_format2_store_records_it_whole(store):
    """Adding a grid rewrites the marker: a format-2 store's marker then records every array's metadata
    (a format-3 marker); a format-1 store (nothing recorded) is not extended."""
    from data_prep.convert import add_grid

    _as_format2(store)
    opts = PrepOptions(patch_size=64, min_tissue=0.0, grid_name="big", thumbnail=False)
    assert add_grid(store, opts) == 16
    opened = open_store(store)
    assert opened.marker.format_version == 3 and opened.complete_grids == {"default", "big"}
    assert set(opened.marker.metadata) >= {"0", "mask", "grids/big", "grids/default/coords"}
    assert verify_store(store) == []
    _set_level_meta(store, "data_type", "float64")
    assert 'data_type "float64", recorded "uint8"' in verify_store(store)[0]
    _set_level_meta(store, "data_type", "uint8")
    doc = _marker_doc(store)
    (store / sf.COMPLETE_MARKER).write_text(
        json.dumps({k: doc[k] for k in ("tool_version", "completed", "grids")})
    )
    _set_attrs_version(store, 1)
    with pytest.warns(UnverifiedStoreWarning), pytest.raises(StoreError, match="records no checksums"):
        add_grid(store, PrepOptions(patch_size=128, min_tissue=0.0, grid_name="huge", thumbnail=False))
