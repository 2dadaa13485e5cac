"""The prefetching stream: same chunks as iter_chunks, bounded read-ahead, errors and shutdown."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from loader_fixtures import random_image, write_store

from ips.data.sources import InMemoryPatchSource, iter_chunks
from ips.data.streaming import stream_chunks
from ips.data.zarr_source import ZarrPatchSource


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ips-prefetch"]


def _wait_until(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


@pytest.fixture(autouse=True)
def no_leaked_threads():
    yield
    assert _wait_until(lambda: not _prefetch_threads(), 2.0), "a prefetch thread outlived its stream"


def _source(n: int = 23) -> InMemoryPatchSource:
    g = torch.Generator().manual_seed(0)
    return InMemoryPatchSource(
        torch.randint(0, 255, (n, 3, 4, 4), dtype=torch.uint8, generator=g), record_reads=True
    )


@pytest.mark.parametrize("chunk_size", [1, 4, 23, 50])
@pytest.mark.parametrize("prefetch", [0, 1, 2, 5])
def test_same_as_iter_chunks(chunk_size, prefetch):
    source = _source()
    order = np.random.default_rng(chunk_size).permutation(len(source))
    expected = list(iter_chunks(source, chunk_size, order))
    got = list(stream_chunks(source, chunk_size, prefetch=prefetch, order=order))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a.indices, b.indices)
        assert torch.equal(a.patches, b.patches) and torch.equal(a.positions, b.positions)


def test_zarr_source_stream(tmp_path):
    store = write_store(tmp_path / "s.zarr", random_image((3, 40, 48)), patch_size=8)
    source = ZarrPatchSource(store)
    expected = list(iter_chunks(source, 7))
    got = list(stream_chunks(source, 7, prefetch=2))
    assert all(torch.equal(a.patches, b.patches) for a, b in zip(got, expected)) and len(got) == len(expected)


def test_empty_source():
    source = InMemoryPatchSource(torch.zeros(0, 3, 4, 4, dtype=torch.uint8), np.zeros((0, 2)))
    assert list(stream_chunks(source, 4)) == []


class FailingSource:
    """Reads fine until chunk `fail_at`, then raises."""

    def __init__(self, inner: InMemoryPatchSource, fail_at: int) -> None:
        self.inner, self.fail_at, self.calls = inner, fail_at, 0
        self.patch_shape, self.spatial_dims = inner.patch_shape, inner.spatial_dims

    def __len__(self) -> int:
        return len(self.inner)

    def positions(self) -> np.ndarray:
        return self.inner.positions()

    def read(self, indices: np.ndarray) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.fail_at:
            raise OSError(f"disk on fire at read {self.calls}")
        return self.inner.read(indices)


@pytest.mark.parametrize("fail_at", [0, 2])
def test_reader_exception_reaches_consumer(fail_at):
    stream = stream_chunks(FailingSource(_source(), fail_at), 4, prefetch=2)
    got = []
    with pytest.raises(OSError, match="disk on fire"):
        for chunk in stream:
            got.append(chunk)
    assert len(got) == fail_at


def test_early_stop_joins_reader():
    source = _source(200)
    stream = stream_chunks(source, 2, prefetch=3)
    next(stream)
    assert len(_prefetch_threads()) == 1
    stream.close()
    assert not _prefetch_threads()
    assert len(source.reads) <= 1 + 3 + 1  # held + prefetch (+ one being read when closed)


def test_break_and_garbage_collection_stop_reader():
    source = _source(200)
    for _ in stream_chunks(source, 2, prefetch=2):
        break  # the generator is dropped: CPython closes it
    assert _wait_until(lambda: not _prefetch_threads())


def test_consumer_exception_stops_reader():
    with pytest.raises(RuntimeError, match="consumer"):
        for _ in stream_chunks(_source(200), 2, prefetch=2):
            raise RuntimeError("consumer failed")
    assert not _prefetch_threads()


@pytest.mark.parametrize("prefetch", [1, 2, 4])
def test_read_ahead_is_bounded(prefetch):
    source = _source(100)
    stream = stream_chunks(source, 5, prefetch=prefetch)
    next(stream)  # hold chunk 0 and do not ask for more
    assert _wait_until(lambda: len(source.reads) == 1 + prefetch)
    time.sleep(0.2)
    assert len(source.reads) == 1 + prefetch  # the held chunk plus `prefetch` ahead, no more
    next(stream)
    assert _wait_until(lambda: len(source.reads) == 2 + prefetch)
    time.sleep(0.1)
    assert len(source.reads) == 2 + prefetch
    stream.close()


def test_reads_overlap_consumer_work():
    """The next chunk is read while the consumer works on this one. Shown by events, not timings: while
    holding each chunk the consumer waits for the read of the next one to start; without overlap that
    read would only start after the consumer asks for it, and the wait would time out."""
    started: list[threading.Event] = [threading.Event() for _ in range(10)]

    class Recording(InMemoryPatchSource):
        def read(self, indices):
            started[int(indices[0]) // 4].set()
            return super().read(indices)

    src = Recording(torch.zeros(40, 1, 2, 2, dtype=torch.uint8))
    for k, _chunk in enumerate(stream_chunks(src, 4, prefetch=2)):
        if k + 1 < len(started):
            assert started[k + 1].wait(timeout=10), f"chunk {k + 1} was not read while chunk {k} was in use"


def test_bad_arguments():
    with pytest.raises(ValueError, match="chunk_size"):
        next(stream_chunks(_source(), 0))
    with pytest.raises(ValueError, match="prefetch"):
        next(stream_chunks(_source(), 2, prefetch=-1))


def test_pin_memory_without_cuda_is_a_no_op():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: see test_pin_memory_cuda")
    chunk = next(iter(stream_chunks(_source(), 4, pin_memory=True)))
    assert not chunk.patches.is_pinned()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pin_memory_cuda():
    for prefetch in (0, 2):
        chunks = list(stream_chunks(_source(), 4, prefetch=prefetch, pin_memory=True))
        assert all(c.patches.is_pinned() and c.positions.is_pinned() for c in chunks)


def test_order_subset_streams_only_those():
    """An order with fewer indices (the rest of an interrupted pass) streams just those, once each."""
    source = _source(20)
    order = np.arange(7, 20)
    got = list(stream_chunks(source, 4, order=order))
    np.testing.assert_array_equal(np.concatenate([c.indices for c in got]), order)
    assert [len(c.indices) for c in got] == [4, 4, 4, 1]
