"""The streaming pyramid writer (`data_prep.pyramid.StreamingPyramid` with `ShardEncoder.put_chunk`):
every level it writes is byte for byte what the whole-shard path writes from the level computed whole
(each level the 2x mean of the whole level below), with the same completion records; and what it holds
in memory meanwhile does not grow with the shard."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zarr

from data_prep.pyramid import StreamingPyramid, downsample2, level_shape, morton_order, plan_levels
from data_prep.writer import ShardEncoder, make_compressor, run_bounded
from ips.format.checksums import file_record


def _image(shape: tuple[int, ...], fill: int, seed: int = 0) -> np.ndarray:
    """`(3, *shape)` uint8: noise with background (= fill) regions, whole chunks and stray pixels."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 250, (3, *shape)).astype(np.uint8)
    img[(slice(None), *(slice(0, n // 3) for n in shape))] = fill  # a background corner
    img[(slice(None), *(slice(n // 2, n // 2 + 1) for n in shape))] = fill
    return img


def _arrays(root: Path, shapes, chunk, shard, codec: str, fill: int) -> list[zarr.Array]:
    group = zarr.create_group(str(root), zarr_format=3)
    out = []
    for k, shape in enumerate(shapes):
        c = tuple(min(a, n) for a, n in zip(chunk, shape))
        s = tuple(min(b, -(-n // a) * a) for b, a, n in zip(shard, c, shape))
        out.append(
            group.create_array(
                str(k),
                shape=(3, *shape),
                dtype=np.uint8,
                chunks=(3, *c),
                shards=(3, *s),
                compressors=make_compressor(codec),
                fill_value=fill,
                config={"write_empty_chunks": False},
            )
        )
    return out


def _whole_levels(img: np.ndarray, factors) -> list[np.ndarray]:
    """The oracle: each level the 2x mean of the whole level above it."""
    levels = [img]
    for prev, cur in zip(factors, factors[1:]):
        halve = tuple(b // a == 2 for a, b in zip(prev, cur))
        top = levels[-1]
        even = top[
            (slice(None), *(slice(0, n // 2 * 2) if h else slice(None) for n, h in zip(top.shape[1:], halve)))
        ]
        levels.append(downsample2(even, halve))
    return levels


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _both(tmp_path, img, *, chunk, shard_chunks, codec="zstd", fill=255, threads=1, spacing=None):
    """Write `img`'s pyramid by the streaming path and by the whole-shard path; returns both folders'
    files, both encoders' records and the pyramid."""
    spatial = img.shape[1:]
    factors = plan_levels(spatial, spacing, max_size=min(spatial) // 5)
    shapes = [level_shape(spatial, f) for f in factors]
    shard = tuple(c * shard_chunks for c in chunk)
    # the whole-shard path: every level computed whole, written shard by shard
    old = _arrays(tmp_path / "old", shapes, chunk, shard, codec, fill)
    old_records = {}
    for k, (arr, level) in enumerate(zip(old, _whole_levels(img, factors))):
        enc = ShardEncoder(arr, tmp_path / "old" / str(k))
        lay = enc.layout
        for idx in np.ndindex(*(-(-n // s) for n, s in zip(level.shape[1:], lay.shard_shape[1:]))):
            start = tuple(i * s for i, s in zip(idx, lay.shard_shape[1:]))
            enc.write(
                start, level[(slice(None), *(slice(a, a + s) for a, s in zip(start, lay.shard_shape[1:])))]
            )
        old_records[str(k)] = enc.records
    # the streaming path, as `ips prep` runs it
    new = _arrays(tmp_path / "new", shapes, chunk, shard, codec, fill)
    encoders = [ShardEncoder(a, tmp_path / "new" / str(k)) for k, a in enumerate(new)]
    pyramid = StreamingPyramid(encoders, factors)
    s0 = encoders[0].shard

    def task(idx):
        def run():
            start = tuple(i * s for i, s in zip(idx, s0))
            block = img[(slice(None), *(slice(a, a + s) for a, s in zip(start, s0)))].copy()
            encoders[0].write(start, block)
            pyramid.add(start, block)

        return run

    grid0 = tuple(-(-n // s) for n, s in zip(spatial, s0))
    run_bounded((task(idx) for idx in morton_order(grid0)), threads)
    assert pyramid.pending == 0
    new_records = {str(k): e.records for k, e in enumerate(encoders)}
    return _files(tmp_path / "old"), _files(tmp_path / "new"), old_records, new_records, pyramid


CASES = [
    # (spatial, chunk, shard_chunks): odd level sizes, edges, a level smaller than a chunk
    ((300, 455), (16, 16), 4),
    ((257, 129), (32, 16), 2),
    ((200, 200), (8, 8), 3),  # odd shard_chunks: a child shard's half splits chunks
    ((150, 230), (14, 18), 2),
]


@pytest.mark.parametrize("spatial, chunk, shard_chunks", CASES)
@pytest.mark.parametrize("codec", ["zstd", "blosc-lz4"])
def test_streamed_pyramid_is_byte_identical_to_the_whole_shard_path(
    tmp_path, spatial, chunk, shard_chunks, codec
):
    img = _image(spatial, 255)
    old, new, old_rec, new_rec, _ = _both(tmp_path, img, chunk=chunk, shard_chunks=shard_chunks, codec=codec)
    assert sorted(old) == sorted(new)
    assert len([k for k in old if "/c/" in k]) > 8
    for key in old:
        assert old[key] == new[key], key
    assert old_rec == new_rec
    # the records are the files' own size and crc32c
    for k, rec in new_rec.items():
        for key, (size, crc) in rec.items():
            assert [size, crc] == file_record(tmp_path / "new" / k / key)
    # and zarr reads back the oracle's levels
    factors = plan_levels(spatial, None, max_size=min(spatial) // 5)
    for k, level in enumerate(_whole_levels(img, factors)):
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "new" / str(k)), mode="r")[...], level)


def test_odd_chunks_along_halved_axes_and_threads(tmp_path):
    """Chunks of odd size (a patch of 99 px, say) pair across chunk borders; 3 threads out of order."""
    img = _image((203, 181), 0, seed=3)
    old, new, old_rec, new_rec, _ = _both(tmp_path, img, chunk=(13, 11), shard_chunks=4, fill=0, threads=3)
    assert old == new and old_rec == new_rec


def test_volume_with_a_z_axis_that_does_not_halve(tmp_path):
    """3D, z coarse (spacing 4 against 1): z is kept while y, x halve."""
    img = _image((9, 70, 66), 255, seed=1)
    old, new, old_rec, new_rec, _ = _both(
        tmp_path, img, chunk=(4, 8, 8), shard_chunks=2, spacing=(4.0, 1.0, 1.0)
    )
    assert any(k.startswith("2/") for k in new)
    assert old == new and old_rec == new_rec


def test_held_chunks_do_not_grow_with_the_shard(tmp_path):
    """The pixels waiting in the pyramid (partly filled chunks) are the same whether a shard holds 2 x 2
    or 16 x 16 chunks, and a few chunks per level; the old writer held one shard per level."""
    img = _image((512, 512), 255, seed=2)
    chunk_bytes = 3 * 16 * 16
    peaks = {}
    for n in (2, 16):
        *_, pyramid = _both(tmp_path / str(n), img, chunk=(16, 16), shard_chunks=n)
        peaks[n] = pyramid.peak_buffered
        assert pyramid.buffered == 0
    n_levels = len(plan_levels((512, 512), None, max_size=512 // 5))
    assert peaks[2] == peaks[16]
    assert 0 < peaks[16] <= 2 * n_levels * chunk_bytes  # a 16 x 16-chunk shard per level: 128x more


def test_shard_encoder_holds_no_encoded_chunks_in_memory(tmp_path):
    """`put_chunk` keeps the encoded chunks on the scratch file: the traced memory after putting a
    whole shard's chunks is a few chunks, whatever the shard; `close_shard` streams them out."""
    arrays = _arrays(tmp_path, [(1024, 1024)], (64, 64), (1024, 1024), "zstd", 255)
    enc = ShardEncoder(arrays[0], tmp_path / "0")
    rng = np.random.default_rng(0)
    chunk = rng.integers(0, 250, (3, 64, 64)).astype(np.uint8)  # incompressible: 12 KB encoded
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for pos in np.ndindex(16, 16):
            enc.put_chunk((0, 0), pos, chunk)
        held = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.reset_peak()
        enc.close_shard((0, 0))
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert held < 256 * 1024, held  # 256 chunks: 3 MB if they were held
    assert peak < 512 * 1024, peak
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "0"), mode="r")[:, 960:, 960:], chunk)
    assert not [p for p in (tmp_path / "0").iterdir() if p.name not in ("zarr.json", "c")]  # no scratch left
