"""Prefetching stream of patch chunks: reading chunk k+1.. hides behind the consumer's work on chunk k.

`stream_chunks` yields exactly what `ips.sources.iter_chunks` yields (same `Chunk`s, same order, each
patch read once), but a background thread does the reads. At most `prefetch` chunks are read ahead of
the one the consumer holds, so host memory is bounded by `(prefetch + 1) * chunk_size` patches whatever
the slide's size. A reader exception is re-raised in the consumer; closing the generator early (break,
`del`, an exception in the consumer) stops and joins the reader thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from ips.data.sources import Chunk, PatchSource, iter_chunks

_POLL_S = 0.05  # how often a blocked reader checks whether the consumer has gone


class _End:
    """Queue item: the reader is done (`error` None) or failed."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


def _pin(chunk: Chunk) -> Chunk:
    """Page-locked copies of the chunk's tensors, so `.to(device, non_blocking=True)` is async."""
    return Chunk(chunk.indices, chunk.patches.pin_memory(), chunk.positions.pin_memory())


class _Reader(threading.Thread):
    """Reads chunks into a queue; `slots` bounds the chunks read and not yet handed back by the consumer
    (the one it holds plus `prefetch` ahead)."""

    def __init__(self, chunks: Iterator[Chunk], prefetch: int, pin_memory: bool) -> None:
        super().__init__(name="ips-prefetch", daemon=True)
        self.chunks = chunks
        self.pin_memory = pin_memory
        self.queue: queue.Queue[Chunk | _End] = queue.Queue()
        self.slots = threading.Semaphore(prefetch + 1)
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while True:
                # wait for a free slot, but leave promptly when the consumer has gone
                while not self.slots.acquire(timeout=_POLL_S):
                    if self.stop.is_set():
                        return
                if self.stop.is_set():
                    return
                chunk = next(self.chunks, None)
                if chunk is None:
                    self.queue.put(_End())
                    return
                self.queue.put(_pin(chunk) if self.pin_memory else chunk)
        except BaseException as e:  # noqa: BLE001 - every failure must reach the consumer
            self.queue.put(_End(e))
        finally:
            self.chunks = iter(())  # drop the source reference as soon as the reader is done


def stream_chunks(
    source: PatchSource,
    chunk_size: int,
    prefetch: int = 2,
    order: np.ndarray | None = None,
    pin_memory: bool = False,
) -> Iterator[Chunk]:
    """Stream `source` in chunks of `chunk_size`, reading up to `prefetch` chunks ahead in a thread.

    Same chunks as `iter_chunks(source, chunk_size, order)`: `indices (n,)`, `patches (n,
    *patch_shape)`, `positions (n, dims)`. `prefetch=0` reads in the calling thread. `pin_memory`
    pins the chunk's tensors (only where CUDA is available; a no-op otherwise).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}")
    pin = pin_memory and torch.cuda.is_available()
    chunks = iter_chunks(source, chunk_size, order)
    if prefetch == 0:
        for chunk in chunks:
            yield _pin(chunk) if pin else chunk
        return
    reader = _Reader(chunks, prefetch, pin)
    reader.start()
    try:
        while True:
            item = reader.queue.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item
            reader.slots.release()  # the consumer is done with this chunk: one more may be read
    finally:
        reader.stop.set()
        reader.join()
