"""Patch reads equal direct slices of the array, whatever the layout, codec, store or read path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from loader_fixtures import grid_coords, random_image, seal, write_store
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, TransposeCodec, ZstdCodec
from zarr.core.buffer import cpu

from ips.data.chunk_io import ChunkReader
from ips.data.zarr_source import FeatureSource, ZarrPatchSource, plan_boxes


def _slice(array: np.ndarray, corner: np.ndarray, patch: tuple[int, ...], fill) -> np.ndarray:
    """`array[:, corner:corner+patch]` `(C, *patch)`, padded with `fill` where it leaves the array."""
    padded = np.pad(array, [(0, 0)] + [(0, p) for p in patch], constant_values=fill)
    return padded[(slice(None),) + tuple(slice(int(c), int(c) + p) for c, p in zip(corner, patch))]


def _check(source: ZarrPatchSource, array: np.ndarray, fill, idx: np.ndarray | None = None) -> None:
    idx = np.arange(len(source)) if idx is None else idx
    got = source.read(idx).numpy()
    for k, i in enumerate(idx):
        np.testing.assert_array_equal(got[k], _slice(array, source.coords[i], source.patch_shape[1:], fill))


def _memory_copy(path: Path) -> zarr.storage.MemoryStore:
    """The store at `path`, copied into a zarr MemoryStore (a non-local store)."""
    data = {
        str(f.relative_to(path)): cpu.Buffer.from_bytes(f.read_bytes())
        for f in path.rglob("*")
        if f.is_file()
    }
    return zarr.storage.MemoryStore(data)


@pytest.mark.parametrize("direct", [True, False])
def test_random_reads_match_zarr_slices(tmp_path, direct):
    image = random_image((3, 100, 90), seed=1)
    image[:, 40:80, :] = 255  # background band: its chunks (and one whole shard row) are unwritten
    store = write_store(tmp_path / "s.zarr", image, patch_size=5)
    source = ZarrPatchSource(store, read_threads=3, direct_chunks=direct)
    level0 = zarr.open_group(store, mode="r")["0"][...]
    rng = np.random.default_rng(0)
    for _ in range(5):
        _check(source, level0, 255, rng.choice(len(source), size=50))
    _check(source, image, 255)


def test_level1_grid_reads_level1(tmp_path):
    image = random_image((3, 80, 64), seed=2)
    store = write_store(tmp_path / "s.zarr", image, patch_size=8, level=1, n_levels=3)
    source = ZarrPatchSource(store)
    assert source.info.level == 1
    _check(source, zarr.open_group(store, mode="r")["1"][...], 255)
    np.testing.assert_array_equal(source.level0_coords(), source.coords * 2)


def test_3d_edges_and_anisotropic_patches(tmp_path):
    image = random_image((2, 9, 14, 11), seed=3)
    store = write_store(tmp_path / "v.zarr", image, patch_size=(3, 4, 5), background=7)
    source = ZarrPatchSource(store)
    assert source.patch_shape == (2, 3, 4, 5)
    _check(source, image, 7)


def test_patches_past_the_image_are_background(tmp_path):
    image = random_image((1, 12, 12), seed=4)
    coords = np.array([[8, 8], [0, 8], [8, 0], [0, 0]])
    store = write_store(tmp_path / "s.zarr", image, patch_size=8, coords=coords, background=200)
    got = ZarrPatchSource(store).read(np.arange(4)).numpy()
    assert (got[0][:, 4:, :] == 200).all() and (got[0][:, :, 4:] == 200).all()
    np.testing.assert_array_equal(got[0][:, :4, :4], image[:, 8:, 8:])
    _check(ZarrPatchSource(store), image, 200)


def test_unwritten_store_reads_background(tmp_path):
    image = np.zeros((3, 64, 64), np.uint8)
    store = write_store(tmp_path / "s.zarr", image, patch_size=8, write_chunks=False, background=255)
    assert not any((store / "0").glob("c/**/*.*")) and not (store / "0" / "c").exists()
    got = ZarrPatchSource(store).read(np.arange(0, 64, 7))
    assert got.shape == (10, 3, 8, 8) and bool((got == 255).all())


def test_memory_store(tmp_path):
    image = random_image((3, 40, 40), seed=5)
    emb = np.random.default_rng(0).standard_normal((25, 4)).astype(np.float32)
    path = write_store(tmp_path / "s.zarr", image, patch_size=8, features={"default": emb})
    source = ZarrPatchSource(_memory_copy(path), read_threads=2)
    assert source._chunks is not None and source._chunks._root is None  # the store-API fetch path
    _check(source, image, 255, np.array([24, 0, 7, 7, 13]))
    feats = FeatureSource(_memory_copy(path))
    np.testing.assert_array_equal(feats.read(np.array([3, 1])).numpy(), emb[[3, 1]])


def _custom_store(
    path: Path, data: np.ndarray, *, chunks, shards, compressors=None, serializer="auto", filters=None
) -> ZarrPatchSource:
    """An ips store whose level 0 uses the given zarr layout (codecs the writer may not use)."""
    patch = tuple(chunks[1:])
    store = write_store(path, data, patch_size=patch, write_chunks=False, background=0)
    root = zarr.open_group(store, mode="r+")
    del root["0"]
    arr = root.create_array(
        "0",
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        shards=shards,
        compressors=compressors,
        serializer=serializer,
        filters=filters,
        fill_value=0,
    )
    arr[...] = data
    seal(store)
    return ZarrPatchSource(store)


@pytest.mark.parametrize(
    "layout",
    [
        dict(compressors=BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")),
        dict(compressors=GzipCodec(level=1)),
        dict(compressors=None),
        dict(compressors=ZstdCodec(level=1), shards=None),
        dict(compressors=ZstdCodec(level=1), serializer=BytesCodec(endian="big"), dtype="uint16"),
        dict(compressors=None, filters=TransposeCodec(order=(0, 2, 1))),  # unsupported: zarr fallback
    ],
)
def test_codecs_and_layouts(tmp_path, layout):
    layout = dict(layout)
    dtype = layout.pop("dtype", "uint8")
    rng = np.random.default_rng(6)
    data = rng.integers(0, 60000 if dtype == "uint16" else 255, (2, 30, 28)).astype(dtype)
    shards = layout.pop("shards", (2, 16, 16))
    source = _custom_store(tmp_path / "s.zarr", data, chunks=(2, 8, 8), shards=shards, **layout)
    expect_direct = "filters" not in layout
    assert (source._chunks is not None) == expect_direct
    assert source.read(np.array([0])).dtype == (torch.uint16 if dtype == "uint16" else torch.uint8)
    _check(source, data, 0, np.random.default_rng(0).permutation(len(source)))


def test_chunk_reader_rejects_unknown_layouts(tmp_path):
    arr = zarr.create_array(
        tmp_path / "a.zarr", shape=(4, 4), chunks=(2, 2), dtype="uint8", filters=TransposeCodec(order=(1, 0))
    )
    assert ChunkReader.for_array(arr) is None


def test_plan_boxes_dense_and_sparse():
    patch, shard, shape = np.array([4, 4]), np.array([16, 16]), np.array([64, 64])
    dense = grid_coords((16, 16), (4, 4), (4, 4))  # one whole shard
    boxes = plan_boxes(dense, patch, shard, shape)
    assert len(boxes) == 1 and (boxes[0].lo == 0).all() and (boxes[0].hi == 16).all()
    sparse = np.array(
        [[0, 0], [0, 4], [12, 12], [32, 0]]
    )  # two touching + one far in shard 0, one in shard 2
    boxes = plan_boxes(sparse, patch, shard, shape)
    spans = sorted((tuple(b.lo), tuple(b.hi)) for b in boxes)
    assert spans == [((0, 0), (4, 8)), ((12, 12), (16, 16)), ((32, 0), (36, 4))]
    assert sorted(np.concatenate([b.members for b in boxes]).tolist()) == [0, 1, 2, 3]
    assert plan_boxes(np.zeros((0, 2), np.int64), patch, shard, shape) == []


def test_source_survives_reopen_after_store_rewrite(tmp_path):
    """Unpickled sources reopen lazily; the shard-index cache is per reader, not global."""
    import pickle

    image = random_image((3, 16, 16), seed=7)
    store = write_store(tmp_path / "s.zarr", image, patch_size=8)
    source = ZarrPatchSource(store)
    clone = pickle.loads(pickle.dumps(source))
    assert clone._array is None and clone._chunks is None
    np.testing.assert_array_equal(clone.read(np.array([3])).numpy(), source.read(np.array([3])).numpy())
