"""Patch sources: what the IPS loop reads patches from.

A patch source is a bag of N patches of one slide or volume. It knows its length, each patch's grid
position, and reads a batch of patches by index. Sources never hold more than the batch they return
(the in-memory source here is the exception by design: it is for tests and small data). The zarr- and
feature-backed sources live in `ips.data.zarr_source`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class PatchSource(Protocol):
    """A bag of N patches.

    Attributes:
        patch_shape: shape of one item: `(C, H, W)` (2D), `(C, D, H, W)` (3D) or `(F,)` (features).
        spatial_dims: 2 or 3 (features keep the spatial_dims of the grid they were computed on).
    """

    patch_shape: tuple[int, ...]
    spatial_dims: int

    def __len__(self) -> int: ...

    def positions(self) -> np.ndarray:
        """Grid positions of all N patches in patch units, float32 `(N, spatial_dims)` (O(N) scalars)."""
        ...

    def read(self, indices: np.ndarray) -> torch.Tensor:
        """Patches at `indices` (int64 `(n,)`), in that order: `(n, *patch_shape)` on the CPU.

        Pixel sources return uint8 (converted to float on the device); feature sources float.
        """
        ...


@dataclass
class Chunk:
    """One step of a streaming pass: `indices (n,)`, `patches (n, *patch_shape)`, `positions (n, dims)`."""

    indices: np.ndarray
    patches: torch.Tensor
    positions: torch.Tensor


def iter_chunks(source: PatchSource, chunk_size: int, order: np.ndarray | None = None) -> Iterator[Chunk]:
    """Stream the source in chunks of `chunk_size` patches, reading each patch once.

    `order` (a permutation of `range(N)`) sets the streaming order; default is index order. An `order`
    with fewer indices streams just those (e.g. the rest of an interrupted pass).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    order = np.arange(len(source), dtype=np.int64) if order is None else np.asarray(order, dtype=np.int64)
    positions = source.positions()
    for start in range(0, len(order), chunk_size):
        idx = order[start : start + chunk_size]
        yield Chunk(idx, source.read(idx), torch.from_numpy(np.ascontiguousarray(positions[idx])))


class InMemoryPatchSource:
    """A patch source over a tensor held in memory (tests, small data, precomputed features).

    Args:
        patches: `(N, *patch_shape)`.
        positions: `(N, spatial_dims)` grid positions in patch units; default: a row-major square-ish
            2D grid (for features without coordinates).
        record_reads: keep a list of the index arrays read (the access record tests inspect).
    """

    def __init__(
        self,
        patches: torch.Tensor,
        positions: np.ndarray | torch.Tensor | None = None,
        *,
        spatial_dims: int | None = None,
        record_reads: bool = False,
    ) -> None:
        if patches.ndim < 2:
            raise ValueError(f"patches must be (N, ...), got shape {tuple(patches.shape)}")
        self.patches = patches
        self.patch_shape = tuple(patches.shape[1:])
        n = patches.shape[0]
        if positions is None:
            side = max(1, int(np.ceil(np.sqrt(n))))
            positions = np.stack(np.divmod(np.arange(n), side), axis=1)
        positions = np.asarray(positions, dtype=np.float32)
        if positions.shape[0] != n or positions.ndim != 2:
            raise ValueError(f"positions must be (N={n}, dims), got {positions.shape}")
        self._positions = positions
        self.spatial_dims = spatial_dims if spatial_dims is not None else positions.shape[1]
        self.reads: list[np.ndarray] | None = [] if record_reads else None

    def __len__(self) -> int:
        return self.patches.shape[0]

    def positions(self) -> np.ndarray:
        return self._positions

    def read(self, indices: np.ndarray) -> torch.Tensor:
        indices = np.asarray(indices, dtype=np.int64)
        if self.reads is not None:
            self.reads.append(indices.copy())
        return self.patches[torch.from_numpy(indices)]
