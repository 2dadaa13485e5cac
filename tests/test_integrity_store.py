"""Store integrity (issue 13): a lost, truncated or damaged chunk is an error that names the store, the
array and the chunk, never background read in silence; `ips verify` checks every checksum."""

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
from ips.data.zarr_source import ZarrPatchSource
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
