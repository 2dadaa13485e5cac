"""One contract every patch source passes (as zarr's `StoreTests`): subclass `PatchSourceContract` and
implement `make`, returning the source and what it must hold.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from loader_fixtures import random_image, write_store

from ips.data.sources import InMemoryPatchSource, PatchSource, iter_chunks
from ips.data.streaming import stream_chunks
from ips.data.zarr_source import FeatureSource, ZarrPatchSource


@dataclass
class Expected:
    """What a source must return: all patches `(N, *patch_shape)` and positions `(N, dims)`."""

    patches: torch.Tensor
    positions: np.ndarray
    spatial_dims: int


class CountingSource:
    """A PatchSource wrapper recording every index it reads."""

    def __init__(self, inner: PatchSource) -> None:
        self.inner = inner
        self.patch_shape = inner.patch_shape
        self.spatial_dims = inner.spatial_dims
        self.counts = np.zeros(len(inner), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.inner)

    def positions(self) -> np.ndarray:
        return self.inner.positions()

    def read(self, indices: np.ndarray) -> torch.Tensor:
        np.add.at(self.counts, np.asarray(indices, dtype=np.int64), 1)
        return self.inner.read(indices)


class PatchSourceContract:
    """The contract. Subclasses implement `make(tmp_path) -> (source, Expected)`."""

    def make(self, tmp_path: Path) -> tuple[PatchSource, Expected]:
        raise NotImplementedError

    @pytest.fixture
    def pair(self, tmp_path: Path) -> tuple[PatchSource, Expected]:
        return self.make(tmp_path)

    def test_protocol(self, pair):
        source, exp = pair
        assert isinstance(source, PatchSource)
        assert source.spatial_dims == exp.spatial_dims
        assert tuple(source.patch_shape) == tuple(exp.patches.shape[1:])

    def test_length(self, pair):
        source, exp = pair
        assert len(source) == exp.patches.shape[0]

    def test_positions(self, pair):
        source, exp = pair
        pos = source.positions()
        assert isinstance(pos, np.ndarray)
        assert pos.dtype == np.float32
        assert pos.shape == (len(source), exp.positions.shape[1])
        np.testing.assert_array_equal(pos, exp.positions)

    def test_read_all_in_order(self, pair):
        source, exp = pair
        out = source.read(np.arange(len(source)))
        assert out.dtype == exp.patches.dtype
        assert out.device.type == "cpu"
        torch.testing.assert_close(out, exp.patches, rtol=0, atol=0)

    def test_read_order_respected(self, pair):
        source, exp = pair
        idx = np.random.default_rng(0).permutation(len(source))[: max(1, len(source) // 2)]
        torch.testing.assert_close(source.read(idx), exp.patches[torch.from_numpy(idx)], rtol=0, atol=0)

    def test_repeated_indices(self, pair):
        source, exp = pair
        n = len(source)
        idx = np.array([n - 1, 0, n - 1, 1 % n, 0, n - 1], dtype=np.int64)
        torch.testing.assert_close(source.read(idx), exp.patches[torch.from_numpy(idx)], rtol=0, atol=0)

    def test_empty_indices(self, pair):
        source, exp = pair
        out = source.read(np.zeros(0, dtype=np.int64))
        assert tuple(out.shape) == (0, *exp.patches.shape[1:])
        assert out.dtype == exp.patches.dtype

    def test_index_dtypes(self, pair):
        source, exp = pair
        idx = np.array([1 % len(source), 0])
        for dt in (np.int32, np.int64, np.uint16):
            torch.testing.assert_close(
                source.read(idx.astype(dt)), exp.patches[torch.from_numpy(idx)], rtol=0, atol=0
            )

    def test_out_of_range(self, pair):
        source, _ = pair
        with pytest.raises(IndexError):
            source.read(np.array([len(source)]))

    @pytest.mark.parametrize("stream", [False, True])
    def test_chunks_read_each_patch_once(self, pair, stream):
        source, exp = pair
        counting = CountingSource(source)
        order = np.random.default_rng(1).permutation(len(source))
        chunks = (
            stream_chunks(counting, 3, prefetch=2, order=order)
            if stream
            else iter_chunks(counting, 3, order=order)
        )
        seen = []
        for chunk in chunks:
            torch.testing.assert_close(
                chunk.patches, exp.patches[torch.from_numpy(chunk.indices)], rtol=0, atol=0
            )
            np.testing.assert_array_equal(chunk.positions.numpy(), exp.positions[chunk.indices])
            seen.append(chunk.indices)
        np.testing.assert_array_equal(np.concatenate(seen), order)
        np.testing.assert_array_equal(counting.counts, np.ones(len(source), dtype=np.int64))

    def test_pickle_roundtrip(self, pair):
        source, exp = pair
        clone = pickle.loads(pickle.dumps(source))
        idx = np.arange(len(source))[::-1].copy()
        torch.testing.assert_close(clone.read(idx), exp.patches[torch.from_numpy(idx)], rtol=0, atol=0)


# --- the sources ------------------------------------------------------------------------------------


def _expected_pixels(
    image: np.ndarray, coords: np.ndarray, patch: tuple[int, ...], stride: tuple[int, ...], background: int
) -> Expected:
    """Patches cut from `image` `(C, *spatial)` by hand, padded with `background` outside it."""
    dims = image.ndim - 1
    padded = np.pad(image, [(0, 0)] + [(0, p) for p in patch], constant_values=background)
    patches = np.stack(
        [padded[(slice(None),) + tuple(slice(c, c + p) for c, p in zip(co, patch))] for co in coords]
    )
    return Expected(torch.from_numpy(patches), (coords / np.asarray(stride)).astype(np.float32), dims)


class TestInMemoryPatchSource(PatchSourceContract):
    def make(self, tmp_path):
        patches = torch.randint(0, 255, (11, 3, 4, 4), dtype=torch.uint8)
        pos = np.stack(np.divmod(np.arange(11), 4), axis=1).astype(np.float32)
        return InMemoryPatchSource(patches, pos), Expected(patches, pos, 2)


class TestZarrPatchSource2D(PatchSourceContract):
    """Chunk-aligned 2D grid with edge patches sticking out and an unwritten background chunk."""

    direct = True

    def make(self, tmp_path):
        image = random_image((3, 37, 45), seed=3)
        image[:, :8, :8] = 255  # an all-background chunk: not written, read back as the fill value
        write_store(tmp_path / "s.zarr", image, patch_size=8, background=255)
        source = ZarrPatchSource(tmp_path / "s.zarr", read_threads=2, direct_chunks=self.direct)
        coords = source.coords
        return source, _expected_pixels(image, coords, (8, 8), (8, 8), 255)


class TestZarrPatchSource2DZarrPath(TestZarrPatchSource2D):
    """The same through zarr's own reads (the fallback path)."""

    direct = False


class TestZarrPatchSource2DOverlap(PatchSourceContract):
    """Overlapping patches (stride < patch): patches span several chunks."""

    direct = True

    def make(self, tmp_path):
        image = random_image((2, 30, 26), seed=4)
        write_store(tmp_path / "s.zarr", image, patch_size=(8, 6), stride=(5, 4), background=0)
        source = ZarrPatchSource(tmp_path / "s.zarr", read_threads=1, direct_chunks=self.direct)
        return source, _expected_pixels(image, source.coords, (8, 6), (5, 4), 0)


class TestZarrPatchSource2DOverlapZarrPath(TestZarrPatchSource2DOverlap):
    direct = False


class TestZarrPatchSource3D(PatchSourceContract):
    direct = True

    def make(self, tmp_path):
        image = random_image((1, 10, 12, 9), seed=5)
        write_store(tmp_path / "v.zarr", image, patch_size=4, background=0)
        source = ZarrPatchSource(tmp_path / "v.zarr", read_threads=3, direct_chunks=self.direct)
        return source, _expected_pixels(image, source.coords, (4, 4, 4), (4, 4, 4), 0)


class TestZarrPatchSource3DZarrPath(TestZarrPatchSource3D):
    direct = False


class TestZarrPatchSourceLevel1(PatchSourceContract):
    """A grid at level 1 reads level 1 (coords in level-1 pixels)."""

    def make(self, tmp_path):
        image = random_image((3, 64, 48), seed=6)
        write_store(tmp_path / "s.zarr", image, patch_size=8, level=1, n_levels=2)
        source = ZarrPatchSource(tmp_path / "s.zarr")
        return source, _expected_pixels(image[:, ::2, ::2], source.coords, (8, 8), (8, 8), 255)


class TestZarrPatchSourcePrep2D(PatchSourceContract):
    """A store made by the real writer (`ips prep`'s pipeline): writer and reader tested together."""

    def make(self, tmp_path):
        convert = pytest.importorskip("data_prep.convert")
        image = random_image((3, 48, 40), seed=8)
        options = convert.PrepOptions(
            patch_size=8, min_tissue=0.0, thumbnail=False, hash_source=False, threads=1
        )
        store = convert.convert_array(image, tmp_path, "s", options=options, mask=np.ones((48, 40), bool))
        source = ZarrPatchSource(store)
        return source, _expected_pixels(image, source.coords, (8, 8), (8, 8), 255)


class TestZarrPatchSourcePrep3D(PatchSourceContract):
    def make(self, tmp_path):
        convert = pytest.importorskip("data_prep.convert")
        image = random_image((2, 12, 16, 8), seed=9)
        options = convert.PrepOptions(
            patch_size=4, min_tissue=0.0, thumbnail=False, hash_source=False, threads=1
        )
        store = convert.convert_array(image, tmp_path, "v", options=options, mask=np.ones((12, 16, 8), bool))
        source = ZarrPatchSource(store)
        return source, _expected_pixels(image, source.coords, (4, 4, 4), (4, 4, 4), 0)


class TestFeatureSource(PatchSourceContract):
    def make(self, tmp_path):
        image = random_image((3, 24, 40), seed=7)
        n = (24 // 8) * (40 // 8)
        emb = np.random.default_rng(0).standard_normal((n, 5)).astype(np.float32)
        write_store(tmp_path / "s.zarr", image, patch_size=8, features={"default": emb})
        source = FeatureSource(tmp_path / "s.zarr")
        coords = source.coords
        return source, Expected(torch.from_numpy(emb), (coords / 8).astype(np.float32), 2)
