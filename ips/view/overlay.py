"""Per-patch scores of one slide (`scores.zarr` of `ips heatmap`) as images at patch resolution.

The grid's cells are its stride: cell `i` along an axis covers level-0 pixels
`[origin + i * stride, origin + (i + 1) * stride)`, and a patch sits in the cell of its top-left corner.
An overlay image has one pixel per cell (RGBA by the shared colour scale, `ips.infer.scale`: attention
relative to uniform; transparent where there is no patch or the patch is at or below the threshold), so it is O(N) whatever the slide's size; the page scales it up
without smoothing. 3D: the image of the plane through a level-0 position, across one axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ips.data.store import IpsStore
from ips.errors import StoreError
from ips.infer.scale import Scale, colorize, global_scale, log_ratio, per_slide
from ips.view.reading import check_tree

AXES = "zyx"
MAX_PATCHES = 1 << 24  # patches of one heatmap (a 250k-patch slide is far below)
MAX_TASKS = 256
MAX_CELLS = 1 << 25  # grid cells of one heatmap (the lookup table: int32 each)


@dataclass(frozen=True)
class PatchGrid:
    """Where a heatmap's patches sit on the store's grid: level0 `(N, d)` corners; size0, stride0, origin0
    `(d,)` in level-0 pixels; cells `(N, d)` cell indices; shape `(d,)` cells per axis; lookup: cell ->
    patch index (-1: none)."""

    level0: np.ndarray
    size0: np.ndarray
    stride0: np.ndarray
    origin0: np.ndarray
    cells: np.ndarray
    shape: tuple[int, ...]
    lookup: np.ndarray

    @classmethod
    def place(cls, level0: np.ndarray, size0: np.ndarray, stride0: np.ndarray) -> PatchGrid:
        """Cells of patches at level-0 corners `level0` `(N, d)`: the grid starts at their least corner.
        Raises StoreError for a grid of more than `MAX_CELLS` cells (a crafted file)."""
        d = len(size0)
        origin0 = level0.min(axis=0) if len(level0) else np.zeros(d, dtype=np.int64)
        cells = (level0 - origin0) // stride0
        shape = tuple(int(v) for v in (cells.max(axis=0) + 1)) if len(cells) else (1,) * d
        if int(np.prod(shape, dtype=np.float64)) > MAX_CELLS:
            raise StoreError(f"the heatmap's patches span {shape} grid cells (at most {MAX_CELLS})")
        lookup = np.full(shape, -1, dtype=np.int32)
        lookup[tuple(cells.T)] = np.arange(len(cells), dtype=np.int32)
        return cls(
            level0=level0,
            size0=size0,
            stride0=stride0,
            origin0=origin0,
            cells=cells,
            shape=shape,
            lookup=lookup,
        )

    def patch_at(self, point0: np.ndarray) -> int:
        """The index of the patch whose cell holds level-0 point `(d,)`, or -1."""
        cell = (np.asarray(point0, dtype=np.int64) - self.origin0) // self.stride0
        if np.any(cell < 0) or np.any(cell >= np.asarray(self.shape)):
            return -1
        return int(self.lookup[tuple(cell)])


@dataclass
class Scores:
    """attention, logit `(N, T)` of tasks `tasks`; selected: indices of the patches the model kept; grid:
    where the patches sit; attrs: the scores' zarr attributes."""

    tasks: list[str]
    attention: np.ndarray
    logit: np.ndarray
    selected: np.ndarray
    grid: PatchGrid
    attrs: dict[str, Any]

    @property
    def n_patches(self) -> int:
        return int(self.attention.shape[0])

    def task_index(self, task: int) -> int:
        if not 0 <= task < len(self.tasks):
            raise KeyError(f"task {task}")
        return task

    def scale(self, task: int, kind: str = "slide", threshold: float = 0.0) -> Scale:
        """The colour scale of `task`: its own peak (`kind` "slide") or the same on every slide
        ("global"); transparent at or below `threshold` (a log2 ratio to uniform)."""
        if kind == "global":
            return global_scale(threshold)
        return per_slide(self.attention[:, self.task_index(task)], threshold)

    def image(
        self, task: int, axis: str | None = None, at0: int = 0, scale: Scale | None = None
    ) -> np.ndarray:
        """uint8 RGBA `(rows, cols, 4)` of task `task` in `scale` (default: the slide's own): the whole
        grid (2D) or the plane through level-0 position `at0` across `axis` (3D)."""
        values = log_ratio(self.attention[:, self.task_index(task)])  # (N,), the same N for every plane
        scale = scale or self.scale(task)
        g = self.grid
        cells = g.cells
        if axis is not None:
            a = AXES.index(axis)
            on = (g.level0[:, a] <= at0) & (at0 < g.level0[:, a] + g.size0[a])
            rest = [i for i in range(3) if i != a]
            values, cells = values[on], cells[on][:, rest]
            shape = tuple(g.shape[i] for i in rest)
        else:
            shape = g.shape
        grid = np.full(shape, np.nan, dtype=np.float64)
        grid[tuple(cells.T)] = values
        return colorize(grid, scale)

    def top(self, task: int, k: int) -> np.ndarray:
        """Indices of the k most attended patches of `task`, best first."""
        return np.argsort(-self.attention[:, self.task_index(task)], kind="stable")[:k]


def _array(root: Any, name: str, where: str) -> Any:
    try:
        node = root[name]
    except KeyError:
        raise StoreError(f"{where}: no array {name!r}") from None
    if not hasattr(node, "shape"):
        raise StoreError(f"{where}: {name!r} is not an array")
    return node


def load_scores(path: Path, store: IpsStore, name: str) -> Scores:
    """Read `scores.zarr` at `path` (`name`: how messages call it) and place its patches on the store's
    grid (geometry from the store). Raises StoreError for a scores folder that is not one `ips heatmap`
    writes (a link inside, arrays of unexpected shapes, too many patches or tasks)."""
    import zarr

    if path.is_symlink() or path.parent.is_symlink():  # below the --heatmaps folder: no links either
        raise StoreError(f"{name}: {path.parent.name}/{path.name} is or lies in a symlink; refused")
    check_tree(path, name)
    root = zarr.open_group(str(path), mode="r")
    attrs = root.attrs.asdict()
    arrays = {k: _array(root, k, name) for k in ("attention", "logit", "level0_coords", "selected")}
    shape, d = tuple(arrays["attention"].shape), store.spatial_dims
    n, t = (shape[0] if shape else 0), (shape[1] if len(shape) == 2 else 0)
    want = {"attention": (n, t), "logit": (n, t), "level0_coords": (n, d), "selected": (n,)}
    got = {k: tuple(a.shape) for k, a in arrays.items()}
    if got != want or not 0 < t <= MAX_TASKS or n > MAX_PATCHES:
        raise StoreError(f"{name}: arrays of shapes {got}: not a heatmap of this slide")
    attention = np.asarray(arrays["attention"][...], dtype=np.float32)
    logit = np.asarray(arrays["logit"][...], dtype=np.float32)
    level0 = np.asarray(arrays["level0_coords"][...], dtype=np.int64)
    selected = np.flatnonzero(np.asarray(arrays["selected"][...], dtype=bool))
    info = store.grid(str(attrs.get("grid", "default")))
    down = store.level_downsample(info.level).astype(np.int64)
    size0 = np.asarray(info.patch_size, dtype=np.int64) * down
    stride0 = np.maximum(np.asarray(info.stride, dtype=np.int64) * down, 1)
    try:
        grid = PatchGrid.place(level0, size0, stride0)
    except StoreError as e:
        raise StoreError(f"{name}: {e}") from None
    tasks = [str(v) for v in attrs.get("tasks", [f"task{i}" for i in range(t)])][:t]
    tasks += [f"task{i}" for i in range(len(tasks), t)]
    return Scores(tasks=tasks, attention=attention, logit=logit, selected=selected, grid=grid, attrs=attrs)
