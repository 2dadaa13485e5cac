"""One sharding layout (ips.format.sharding) for the writer and the reader, checked against zarr-python
both ways for every codec the writer offers (data_prep.options.CODECS)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from data_prep.options import CODECS
from data_prep.writer import ShardEncoder, make_compressor
from ips.data.chunk_io import ChunkReader
from ips.format.sharding import CorruptShard, ShardLayout, UnsupportedLayout


def _image(dtype, fill, shape=(2, 150, 230)) -> np.ndarray:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 200, shape).astype(dtype)
    data[:, :32, :32] = fill  # a background chunk
    data[:, 128:, 128:] = fill  # a background shard at the corner
    return data


def _array(path, data, codec, fill) -> zarr.Array:
    return zarr.create_array(
        str(path),
        shape=data.shape,
        dtype=data.dtype,
        chunks=(data.shape[0], 32, 32),
        shards=(data.shape[0], 128, 128),
        compressors=make_compressor(codec),
        fill_value=fill,
        config={"write_empty_chunks": False},
    )


def _read_all(reader: ChunkReader, shape) -> np.ndarray:
    out = np.empty((1, *shape), dtype=reader.dtype)
    reader.read_boxes(np.zeros((1, len(shape)), np.int64), shape, out, np.array([0]))
    return out[0]


CASES = [(codec, dtype, fill) for codec in CODECS for dtype, fill in [(np.uint8, 255), (np.uint16, 0)]]


@pytest.mark.parametrize("codec, dtype, fill", CASES)
def test_zarr_reads_what_the_writer_writes(tmp_path, codec, dtype, fill):
    data = _image(dtype, fill)
    arr = _array(tmp_path / "a", data, codec, fill)
    enc = ShardEncoder(arr, tmp_path / "a")
    for y in range(0, 150, 128):
        for x in range(0, 230, 128):
            enc.write((y, x), data[:, y : y + 128, x : x + 128])
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a"), mode="r")[...], data)
    assert not (tmp_path / "a" / "c" / "0" / "1" / "1").exists()  # all background: no file
    assert sorted(enc.records) == ["c/0/0/0", "c/0/0/1", "c/0/1/0"]


@pytest.mark.parametrize("codec, dtype, fill", CASES)
def test_the_reader_reads_what_zarr_writes(tmp_path, codec, dtype, fill):
    data = _image(dtype, fill)
    arr = _array(tmp_path / "a", data, codec, fill)
    arr[...] = data
    reader = ChunkReader.for_array(arr)
    assert reader is not None
    np.testing.assert_array_equal(_read_all(reader, data.shape), data)


def test_layout_keys_and_index(tmp_path):
    arr = _array(tmp_path / "a", _image(np.uint8, 255), "zstd", 255)
    lay = ShardLayout.of(arr)
    assert lay.key((0, 1, 2)) == "c/0/1/2" and lay.chunks_per_shard == (1, 4, 4)
    index = np.arange(32, dtype="<u8").reshape(1, 4, 4, 2)
    raw = lay.encode_index(index)
    np.testing.assert_array_equal(lay.decode_index(raw), index)
    with pytest.raises(CorruptShard, match="checksum"):
        lay.decode_index(raw[:5] + bytes([raw[5] ^ 1]) + raw[6:])
    with pytest.raises(CorruptShard, match="truncated"):
        lay.decode_index(raw[1:])


def test_unsupported_layouts_are_named(tmp_path):
    from zarr.codecs import TransposeCodec

    arr = zarr.create_array(
        str(tmp_path / "t"),
        shape=(4, 4),
        dtype="uint8",
        chunks=(2, 2),
        filters=[TransposeCodec(order=(1, 0))],
    )
    with pytest.raises(UnsupportedLayout):
        ShardLayout.of(arr)
    assert ChunkReader.for_array(arr) is None
