"""Per-patch scores of one slide (`scores.zarr` of `ips heatmap`) as images at patch resolution.

The grid's cells are its stride: cell `i` along an axis covers level-0 pixels
`[origin + i * stride, origin + (i + 1) * stride)`, and a patch sits in the cell of its top-left corner.
An overlay image has one pixel per cell (RGBA by the shared colour map, `ips.infer.render.colorize`;
transparent where there is no patch), so it is O(N) whatever the slide's size; the page scales it up
without smoothing. 3D: the image of the plane through a level-0 position, across one axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ips.data.store import IpsStore
from ips.infer.render import colorize

AXES = "zyx"


@dataclass
class Scores:
    """attention, logit `(N, T)`; level0 `(N, d)` corners; size0, stride0, origin0 `(d,)` in level-0 pixels;
    cells `(N, d)` cell indices; shape `(d,)` cells per axis; lookup: cell -> patch index (-1: none)."""

    tasks: list[str]
    attention: np.ndarray
    logit: np.ndarray
    level0: np.ndarray
    selected: np.ndarray
    size0: np.ndarray
    stride0: np.ndarray
    origin0: np.ndarray
    cells: np.ndarray
    shape: tuple[int, ...]
    lookup: np.ndarray
    attrs: dict[str, Any]

    @property
    def n_patches(self) -> int:
        return int(self.attention.shape[0])

    def task_index(self, task: int) -> int:
        if not 0 <= task < len(self.tasks):
            raise KeyError(f"task {task}")
        return task

    @property
    def vmin(self) -> float:
        """The uniform share 1/N: patches attended no more than that are transparent (a near-uniform map
        would otherwise tint the whole slide)."""
        return 1.0 / max(self.n_patches, 1)

    def vmax(self, task: int) -> float:
        a = self.attention[:, task]
        return float(a.max()) if a.size else 1.0

    def image(self, task: int, axis: str | None = None, at0: int = 0) -> np.ndarray:
        """uint8 RGBA `(rows, cols, 4)` of task `task`: the whole grid (2D) or the plane through level-0
        position `at0` across `axis` (3D)."""
        values = self.attention[:, self.task_index(task)]
        cells = self.cells
        if axis is not None:
            a = AXES.index(axis)
            on = (self.level0[:, a] <= at0) & (at0 < self.level0[:, a] + self.size0[a])
            rest = [i for i in range(3) if i != a]
            values, cells = values[on], cells[on][:, rest]
            shape = tuple(self.shape[i] for i in rest)
        else:
            shape = self.shape
        grid = np.full(shape, np.nan, dtype=np.float64)
        grid[tuple(cells.T)] = values
        return colorize(grid, self.vmax(task), self.vmin)

    def patch_at(self, point0: np.ndarray) -> int:
        """The index of the patch whose cell holds level-0 point `(d,)`, or -1."""
        cell = (np.asarray(point0, dtype=np.int64) - self.origin0) // self.stride0
        if np.any(cell < 0) or np.any(cell >= np.asarray(self.shape)):
            return -1
        return int(self.lookup[tuple(cell)])

    def top(self, task: int, k: int) -> np.ndarray:
        """Indices of the k most attended patches of `task`, best first."""
        return np.argsort(-self.attention[:, self.task_index(task)], kind="stable")[:k]


def load_scores(path: Path, store: IpsStore) -> Scores:
    """Read `scores.zarr` and place its patches on the store's grid (geometry from the store)."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    attrs = root.attrs.asdict()
    attention = np.asarray(root["attention"][...], dtype=np.float32)
    logit = np.asarray(root["logit"][...], dtype=np.float32)
    level0 = np.asarray(root["level0_coords"][...], dtype=np.int64)
    selected = np.flatnonzero(np.asarray(root["selected"][...], dtype=bool))
    info = store.grid(str(attrs.get("grid", "default")))
    down = store.level_downsample(info.level).astype(np.int64)
    size0 = np.asarray(info.patch_size, dtype=np.int64) * down
    stride0 = np.maximum(np.asarray(info.stride, dtype=np.int64) * down, 1)
    origin0 = level0.min(axis=0) if len(level0) else np.zeros(store.spatial_dims, dtype=np.int64)
    cells = (level0 - origin0) // stride0
    shape = tuple(int(v) for v in (cells.max(axis=0) + 1)) if len(cells) else (1,) * store.spatial_dims
    lookup = np.full(shape, -1, dtype=np.int64)
    lookup[tuple(cells.T)] = np.arange(len(cells))
    tasks = [str(t) for t in attrs.get("tasks", [f"task{i}" for i in range(attention.shape[1])])]
    return Scores(
        tasks, attention, logit, level0, selected, size0, stride0, origin0, cells, shape, lookup, attrs
    )
