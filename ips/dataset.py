"""Slides as a torch Dataset of (record, patch source), and a deterministic (distributed) slide sampler.

A dataset item is a slide's manifest record and an opened patch source: stores are opened lazily in
`__getitem__` (in a DataLoader worker when there are workers) and the source itself is what the IPS loop
reads patches from. Everything here pickles, so `DataLoader(num_workers > 0)` works; use
`collate=collate_slides` (items are not tensors).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler

from ips.config import DataConfig
from ips.manifest import SlideRecord
from ips.sources import PatchSource
from ips.zarr_source import FeatureSource, ZarrPatchSource

SourceFactory = Callable[[SlideRecord], PatchSource]


@dataclass(frozen=True)
class StoreSourceFactory:
    """Opens a record's store as pixels of `grid` or as precomputed `features` (picklable)."""

    mode: str = "pixels"
    grid: str = "default"
    features: str = "default"
    read_threads: int = 4

    @classmethod
    def from_config(cls, data: DataConfig) -> StoreSourceFactory:
        return cls(data.mode, data.grid, data.features, data.read_threads)

    def __call__(self, record: SlideRecord) -> PatchSource:
        if self.mode == "features":
            return FeatureSource(record.path, self.features)
        if self.mode == "pixels":
            return ZarrPatchSource(record.path, self.grid, self.read_threads)
        raise ValueError(f"unknown data mode {self.mode!r}; expected 'pixels' or 'features'")


class SlideDataset(Dataset):
    """Item i: `(records[i], make_source(records[i]))`, the source opened on access.

    `make_source` must pickle for DataLoader workers (a module-level function, a `functools.partial`
    of one, or a `StoreSourceFactory`).
    """

    def __init__(self, records: Sequence[SlideRecord], make_source: SourceFactory) -> None:
        self.records = list(records)
        self.make_source = make_source

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[SlideRecord, PatchSource]:
        record = self.records[i]
        return record, self.make_source(record)


def collate_slides(batch: list[tuple[SlideRecord, PatchSource]]) -> list[tuple[SlideRecord, PatchSource]]:
    """DataLoader collate for `SlideDataset`: the batch as a list of (record, source)."""
    return list(batch)


class SlideSampler(Sampler[int]):
    """Deterministic per-epoch slide order, split over `world_size` ranks.

    Epoch e shuffles with a generator seeded `seed + e` (call `set_epoch` each epoch), then, as torch's
    `DistributedSampler`, pads the order by repeating its start until it divides by `world_size` (or
    drops the tail with `drop_last`), and rank r takes positions r, r + world_size, ...: disjoint,
    equal-length shares that together cover every slide.
    """

    def __init__(self, n: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        if drop_last:
            self.per_rank = n // world_size
        else:
            self.per_rank = math.ceil(n / world_size) if n else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world_size
        if total > len(order) and order:
            reps = math.ceil(total / len(order))
            order = (order * reps)[:total]
        order = order[:total]
        return iter(order[self.rank::self.world_size])
