"""One sharding layout (ips.format.sharding) for the writer and the reader, checked against zarr-python
both ways for every codec the writer offers (data_prep.options.CODECS); lossy codecs (uint8 RGB only)
decode to the same pixels through zarr and through the direct reader."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from data_prep.options import CODECS, LOSSY_CODECS
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
    if codec in LOSSY_CODECS:  # as data_prep.writer lays them out: (C, y, x) chunks seen as (y, x, C)
        from zarr.codecs import TransposeCodec

        codecs = {"filters": [TransposeCodec(order=(1, 2, 0))], "serializer": make_compressor(codec)}
        codecs["compressors"] = None
    else:
        codecs = {"compressors": make_compressor(codec)}
    return zarr.create_array(
        str(path),
        shape=data.shape,
        dtype=data.dtype,
        chunks=(data.shape[0], 32, 32),
        shards=(data.shape[0], 128, 128),
        fill_value=fill,
        config={"write_empty_chunks": False},
        **codecs,
    )


def _read_all(reader: ChunkReader, shape) -> np.ndarray:
    out = np.empty((1, *shape), dtype=reader.dtype)
    reader.read_boxes(np.zeros((1, len(shape)), np.int64), shape, out, np.array([0]))
    return out[0]


LOSSLESS = [c for c in CODECS if c not in LOSSY_CODECS]
CASES = [(codec, dtype, fill) for codec in LOSSLESS for dtype, fill in [(np.uint8, 255), (np.uint16, 0)]]


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


@pytest.mark.parametrize("codec", LOSSY_CODECS)
def test_lossy_codecs_decode_alike_in_zarr_and_the_reader(tmp_path, codec):
    """Written by the writer's encoder and by zarr: zarr's decoding and the direct reader's are equal,
    the background is exact (unwritten), and the pixels are near the source."""
    from data_prep.testing import texture_image

    data = texture_image(150, 230).transpose(2, 0, 1).copy()
    data[:, :32, :32] = data[:, 128:, 128:] = 255  # a background chunk and shard, as in `_image`
    written = _array(tmp_path / "w", data, codec, 255)
    enc = ShardEncoder(written, tmp_path / "w")
    for y in range(0, 150, 128):
        for x in range(0, 230, 128):
            enc.write((y, x), data[:, y : y + 128, x : x + 128])
    by_zarr = _array(tmp_path / "z", data, codec, 255)
    by_zarr[...] = data
    for path, arr in ((tmp_path / "w", written), (tmp_path / "z", by_zarr)):
        decoded = zarr.open_array(str(path), mode="r")[...]
        reader = ChunkReader.for_array(arr)
        assert reader is not None
        np.testing.assert_array_equal(_read_all(reader, data.shape), decoded)
        assert (decoded[:, 128:, 128:] == 255).all() and (decoded[:, :32, :32] == 255).all()
        assert np.abs(decoded.astype(int) - data).mean() < 3
    assert sorted(enc.records) == ["c/0/0/0", "c/0/0/1", "c/0/1/0"]


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
