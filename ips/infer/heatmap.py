"""Attention heatmaps of one slide or volume: every file a pathologist (or a viewer) opens.

Under `out_dir/` (the CLI makes it `DIR/<slide_id>/`):

- `scores.zarr`: per-patch scores (zarr v3 group): `attention (N, T)`, `logit (N, T)` (mean over heads),
  `head_logits (N, T, H)`, `coords (N, d)` (pixels of the grid's level), `level0_coords (N, d)`,
  `selected (N,)` (in the top-M the prediction used); attributes: tasks, lse, grid, predictions.
- `heatmap.png`: attention over the thumbnail (a low pyramid level), one panel per task, colour bar,
  slide id and prediction in the titles (3D: maximum over z on the volume's projection). Colours follow
  `ips.infer.scale`: per slide, or one global scale for every slide drawn together (`draw_overlays`
  after all slides' passes; the scale used is in scores.zarr's `colour_scales` attribute).
- `heatmap.geojson` (2D): one polygon per patch in level-0 pixels for QuPath (`ips.infer.geojson`).
- `heatmap.nii.gz` (3D): attention per grid cell in the source's world space (`ips.infer.nifti`), plus
  `slice_z.png`, `slice_y.png`, `slice_x.png`: orthogonal planes through the peak patch.
- `top_patches.png`: the top-k patches by attention of each shown task, read through the source.

Attention is exact over all N patches, gathered by the selection pass itself (`Predictor.infer`,
`ips.infer.slide`); memory is the top-M buffer and one chunk of patches plus O(N) scalars plus
thumbnail-sized images, whatever the slide's size. A global scale adds one float per slide and task:
the PNGs are drawn afterwards from each slide's scores.zarr, one slide at a time.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ips.config import ConfigError, TaskConfig
from ips.data.manifest import SlideRecord
from ips.data.open import SourceFactory
from ips.data.sources import PatchSource
from ips.data.store import IpsStore, open_store
from ips.infer.engine import Loaded
from ips.infer.geojson import write_geojson
from ips.infer.render import (
    max_over_axis,
    paint_patches,
    read_thumbnail,
    save_gallery,
    save_overlay,
    thumbnail_level,
    to_rgb,
)
from ips.infer.scale import Scale, legend_text, log_ratio, peak, per_slide, relative
from ips.infer.slide import Mode, SlideInference
from ips.model.tasks import probabilities

SCORES = "scores.zarr"
VOLUME_THUMB_SIZE = 256  # longest y/x side of the level 3D overlays are drawn on


@dataclass
class GridGeometry:
    """Where each patch is: `coords (N, d)` in pixels of `level`; `level0 (N, d)`, `size0 (d,)` and
    `stride0 (d,)` in level-0 pixels."""

    grid: str
    level: int
    coords: np.ndarray
    level0: np.ndarray
    size0: np.ndarray
    stride0: np.ndarray


@dataclass
class StoredScores:
    """A slide's attention `(N, T)` read back from its scores.zarr: what drawing its PNGs again needs."""

    attention: np.ndarray

    @property
    def n_patches(self) -> int:
        return len(self.attention)


@dataclass
class Drawing:
    """What every file of one slide is drawn from: its id, store and patch geometry, the inference pass
    (or its stored attention, for the PNGs), the indices of the tasks shown, their panel titles, and the
    thumbnail size."""

    slide_id: str
    store: IpsStore
    geom: GridGeometry
    inf: SlideInference | StoredScores
    show: Sequence[int]
    titles: Sequence[str]
    thumb_size: int


@dataclass
class HeatmapResult:
    """What `write_slide_heatmaps` wrote: the files, N, and per-task probabilities of the chosen mode;
    for drawing the PNGs later (`draw_overlays`): the shown task indices, their titles, each one's peak
    (`ips.infer.scale.peak`) and the thumbnail size."""

    slide_id: str
    out_dir: Path
    n_patches: int
    files: list[Path] = field(default_factory=list)
    probabilities: dict[str, list[float]] = field(default_factory=dict)
    show: list[int] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)
    thumb_size: int = 1024


def slide_id_of_store(path: str | Path) -> str:
    """`DIR/<slide_id>.zarr` -> `<slide_id>` (the name `ips prep` gave it)."""
    name = Path(str(path).rstrip("/")).name
    return name[: -len(".zarr")] if name.endswith(".zarr") else name


def select_tasks(tasks: Sequence[TaskConfig], name: str | None) -> list[int]:
    """Indices of the tasks to draw: all, or the one named (ConfigError naming the valid ones)."""
    if name is None:
        return list(range(len(tasks)))
    names = [t.name for t in tasks]
    if name not in names:
        raise ConfigError(f"--task: unknown task {name!r}; the checkpoint's tasks: {', '.join(names)}")
    return [names.index(name)]


def grid_geometry(store: IpsStore, source: PatchSource, sources: SourceFactory) -> GridGeometry:
    """The patch geometry of the grid the source reads (features: the grid they were computed on)."""
    grid = sources.grid_of(store)
    info = store.grid(grid)
    coords = getattr(source, "coords", None)  # the source's copy: the store's is read only if it has none
    coords = np.asarray(store.coords(grid) if coords is None else coords, dtype=np.int64)
    down = store.level_downsample(info.level).astype(np.int64)
    return GridGeometry(
        grid,
        info.level,
        coords,
        coords * down,
        np.asarray(info.patch_size) * down,
        np.asarray(info.stride) * down,
    )


def describe_prediction(task: TaskConfig, logits: torch.Tensor) -> str:
    """A short text of one task's prediction from its logits `(n_out,)`."""
    p = probabilities(task, logits[None])[0]
    if task.kind == "binary":
        return f"P({task.name})={float(p):.3f}"
    if task.kind in ("multiclass", "ordinal"):
        c = int(p.argmax())
        return f"{task.name}: class {c} ({float(p[c]):.3f})"
    if task.kind == "regression":
        return f"{task.name}={float(p):.3g}"
    if task.kind == "survival":
        return f"{task.name}: risk {float(p):.3g}"
    on = [str(i) for i in range(len(p)) if p[i] > 0.5]
    return f"{task.name}: {{{','.join(on)}}}"


def write_scores(
    path: Path, inf: SlideInference, geom: GridGeometry, tasks: Sequence[TaskConfig], attrs: dict[str, object]
) -> Path:
    """The per-patch scores as a zarr v3 group (written beside, then renamed into place)."""
    import zarr

    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    root = zarr.open_group(str(tmp), mode="w")
    selected = np.zeros(inf.n_patches, dtype=bool)
    selected[inf.selected] = True
    arrays = {
        "attention": inf.attention,
        "logit": inf.mean_logit,
        "head_logits": inf.head_logits,
        "coords": geom.coords,
        "level0_coords": geom.level0,
        "selected": selected,
    }
    for name, value in arrays.items():
        arr = root.create_array(
            name,
            shape=value.shape,
            dtype=value.dtype,
            chunks=(max(1, min(len(value), 1 << 18)), *value.shape[1:]),
        )
        if value.size:
            arr[...] = value
    root.attrs.update(
        {
            "tasks": [t.name for t in tasks],
            "lse": inf.lse.tolist(),
            "grid": geom.grid,
            "level": geom.level,
            "patch_size_level0": geom.size0.tolist(),
            "stride_level0": geom.stride0.tolist(),
            "definition": "attention[i,t] = mean_h softmax over all N of head_logits[:,t,h]; logit = mean_h",
            **attrs,
        }
    )
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def _patch_images(patches: torch.Tensor) -> list[np.ndarray]:
    """Patches `(k, C, *S)` -> RGB `(Y, X, 3)` uint8 each (3D: the middle z-plane), stretched jointly."""
    x = patches.numpy()
    if x.ndim == 5:  # (k, C, D, H, W)
        x = x[:, :, x.shape[2] // 2]
    if x.dtype != np.uint8 and x.size:
        lo, hi = np.percentile(x.astype(np.float32), [0.5, 99.5])
        x = np.clip((x.astype(np.float32) - lo) / max(float(hi - lo), 1e-6) * 255.0, 0, 255).astype(np.uint8)
    return [to_rgb(p) for p in x]


def _pixel_source(source: PatchSource, store_path: str, features: bool, grid: str) -> PatchSource:
    if not features:
        return getattr(source, "base", source)  # a context source: the patches alone
    from ips.data.zarr_source import ZarrPatchSource

    return ZarrPatchSource(store_path, grid=grid, read_threads=1)


def write_gallery(
    path: Path, source: PatchSource, drawing: Drawing, tasks: Sequence[TaskConfig], top_k: int
) -> Path:
    """The top-k patches of each shown task (one row block per task), read by index (k patches)."""
    inf, show, slide_id = drawing.inf, drawing.show, drawing.slide_id
    attention = inf.attention
    images: list[np.ndarray] = []
    captions: list[str] = []
    k = min(top_k, inf.n_patches)
    for t in show:
        order = np.argsort(-attention[:, t], kind="stable")[:k]
        images += _patch_images(source.read(order))
        captions += [
            f"{tasks[t].name} #{r + 1}: patch {i}\nattn {attention[i, t]:.3g}" for r, i in enumerate(order)
        ]
    return save_gallery(
        path, images, captions, title=f"{slide_id}: top {k} patches by attention", columns=min(8, max(1, k))
    )


def _overlay(path: Path, drawing: Drawing, scales: Sequence[Scale]) -> Path:
    """heatmap.png: one panel per shown task over the thumbnail (3D: maximum over z on the projection),
    coloured by `scales` (one per shown task)."""
    store, geom, inf, show = drawing.store, drawing.geom, drawing.inf, drawing.show
    base, level = read_thumbnail(store, drawing.thumb_size)
    ds = store.level_downsample(level)[-2:]
    ratio = log_ratio(inf.attention)  # (N, T): log2 of attention relative to uniform, the shared scale
    if geom.level0.shape[1] == 3:  # a volume seen from above: the maximum over z per (y, x)
        heats = []
        for t in show:
            yx, values = max_over_axis(geom.level0, ratio[:, t], axis=0)
            heats.append(paint_patches(values, yx, geom.size0[1:], ds, base.shape[:2]))
        label = "attention / uniform (1/N), max over z"
    else:
        heats = [paint_patches(ratio[:, t], geom.level0, geom.size0, ds, base.shape[:2]) for t in show]
        label = "attention / uniform (1/N)"
    return save_overlay(
        path,
        base,
        heats,
        [f"{title}\n{legend_text(scale)}" for title, scale in zip(drawing.titles, scales)],
        suptitle=f"{drawing.slide_id} ({inf.n_patches} patches)",
        colorbar_label=label,
        scales=scales,
        aspect=_aspect(store, level, (-2, -1)),
    )


def _aspect(store: IpsStore, level: int, axes: tuple[int, int]) -> float:
    """Physical height / width of a pixel of `level` on the plane of spatial `axes` (rows, cols)."""
    ds = store.level_downsample(level)
    spacing = np.asarray(store.source_spacing or [1.0] * store.spatial_dims, dtype=np.float64)
    size = spacing * ds  # ds: from the source's level 0
    return float(size[axes[0]] / size[axes[1]])


def _slices_3d(out_dir: Path, drawing: Drawing, scale: Scale) -> list[Path]:
    """Three orthogonal planes (of a low level) through the centre of the most attended patch of the
    first shown task, coloured by `scale`."""
    store, geom, inf = drawing.store, drawing.geom, drawing.inf
    t, title = drawing.show[0], drawing.titles[0]
    level = thumbnail_level(store, drawing.thumb_size)
    array = store.level(level)
    ds = store.level_downsample(level)
    attention = inf.attention
    ratio = log_ratio(attention[:, t])  # (N,): the shared colour scale's values
    peak = int(np.argmax(attention[:, t]))
    centre0 = geom.level0[peak] + geom.size0 // 2  # (z, y, x) level-0 voxels
    files = []
    for axis, name in enumerate("zyx"):
        pos = int(min(centre0[axis] // ds[axis], array.shape[1 + axis] - 1))
        index: list[slice | int] = [slice(None)] * 4
        index[1 + axis] = pos
        plane = np.asarray(array[tuple(index)])  # (C, rows, cols): one plane of a low level
        base = to_rgb(plane)
        lo, hi = geom.level0[:, axis], geom.level0[:, axis] + geom.size0[axis]
        on = (lo <= centre0[axis]) & (centre0[axis] < hi)  # patches this plane cuts
        rest = [a for a in range(3) if a != axis]
        heat = paint_patches(ratio[on], geom.level0[on][:, rest], geom.size0[rest], ds[rest], base.shape[:2])
        mark = (float(centre0[rest[0]] / ds[rest[0]]), float(centre0[rest[1]] / ds[rest[1]]))
        files.append(
            save_overlay(
                out_dir / f"slice_{name}.png",
                base,
                [heat],
                [
                    f"{title}\n{name} = {int(centre0[axis])} (level-0 voxel), rows {'zyx'[rest[0]]}, "
                    f"cols {'zyx'[rest[1]]}"
                ],
                suptitle="plane through the most attended patch (circled)",
                colorbar_label="attention / uniform (1/N)",
                scales=[scale],
                aspect=_aspect(store, level, (rest[0], rest[1])),
                marks=[mark],
            )
        )
    return files


def _nifti(path: Path, drawing: Drawing) -> Path:
    from ips.infer.nifti import grid_volume, heatmap_affine, source_affine, write_nifti

    store, geom, inf, show = drawing.store, drawing.geom, drawing.inf, drawing.show
    shape0 = tuple(int(s) for s in store.level(0).shape[1:])
    volume, origin = grid_volume(geom.level0, geom.stride0, inf.attention[:, list(show)], shape0)
    affine = heatmap_affine(source_affine(store), origin, geom.stride0, geom.size0)
    prov = store.attrs.get("provenance") or {}
    return write_nifti(
        path,
        volume,
        affine,
        qform_code=int(prov.get("nifti_qform_code") or 1),
        sform_code=int(prov.get("nifti_sform_code") or 1),
    )


def _geojson(path: Path, drawing: Drawing, tasks: Sequence[TaskConfig]) -> Path:
    """QuPath detections: one polygon per patch with its attention and logit per task, and whether the
    top-M selection holds it."""
    geom, inf = drawing.geom, drawing.inf
    measurements: dict[str, np.ndarray] = {}
    for t, spec in enumerate(tasks):
        measurements[f"{spec.name} attention"] = inf.attention[:, t]
        # the colour scale's quantity (`ips.infer.scale`): 1 = uniform; colour QuPath's map by it
        measurements[f"{spec.name} attention x uniform"] = relative(inf.attention[:, t])
        measurements[f"{spec.name} logit"] = inf.mean_logit[:, t]
    selected = np.zeros(inf.n_patches, dtype=bool)
    selected[inf.selected] = True
    measurements["selected"] = selected.astype(np.float32)
    return write_geojson(path, geom.level0, geom.size0, measurements, selected)


def write_slide_heatmaps(
    loaded: Loaded,
    record: SlideRecord,
    out_dir: str | Path,
    *,
    task: str | None = None,
    top_k: int = 16,
    mode: Mode = "topm",
    thumb_size: int = 1024,
    checkpoint: str | None = None,
    threshold: float = 0.0,
    overlays: bool = True,
) -> HeatmapResult:
    """Every heatmap file of one store (module docstring), from one pass of the checkpoint's predictor.
    The PNGs use the slide's own colour scale, transparent at or below `threshold` (a log2 ratio to
    uniform); `overlays=False` leaves them to `draw_overlays` (a scale shared with other slides).
    Raises ConfigError / StoreError naming the store."""
    tasks = loaded.cfg.model.tasks
    show = select_tasks(tasks, task)
    source = loaded.open(record)
    store = open_store(record.path)
    geom = grid_geometry(store, source, loaded.sources)
    modes: tuple[Mode, ...] = ("topm",) if mode == "topm" else ("topm", "all")  # top-M flags the GeoJSON
    inf = loaded.predictor.infer(source, modes=modes)
    logits = inf.logits[mode]
    if store.spatial_dims == 3:  # a volume's thumbnail level is read whole (projection): keep it small
        thumb_size = min(thumb_size, VOLUME_THUMB_SIZE)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = HeatmapResult(record.slide_id, out, inf.n_patches, show=list(show), thumb_size=thumb_size)
    result.probabilities = {
        t.name: probabilities(t, logits[t.name][None])[0].reshape(-1).tolist() for t in tasks
    }
    result.titles = [
        f"{record.slide_id}: {tasks[t].name} attention, {describe_prediction(tasks[t], logits[tasks[t].name])}"
        f" ({mode})"
        for t in show
    ]
    result.peaks = [peak(inf.attention[:, t]) for t in show]
    scales = [per_slide(inf.attention[:, t], threshold) for t in show]
    attrs = {
        "slide_id": record.slide_id,
        "store": str(record.path),
        "checkpoint": checkpoint,
        "mode": mode,
        "probabilities": result.probabilities,
        "memory_size": loaded.predictor.selector.memory_size,
        "colour_scales": _scale_attrs([t.name for t in tasks], show, scales) if overlays else {},
    }
    result.files.append(write_scores(out / SCORES, inf, geom, tasks, attrs))
    drawing = Drawing(
        slide_id=record.slide_id,
        store=store,
        geom=geom,
        inf=inf,
        show=show,
        titles=result.titles,
        thumb_size=thumb_size,
    )
    if overlays:
        result.files += _draw(out, drawing, scales)
    if store.spatial_dims == 2:
        result.files.append(_geojson(out / "heatmap.geojson", drawing, tasks))
    else:
        result.files.append(_nifti(out / "heatmap.nii.gz", drawing))
    if top_k > 0:
        pixels = _pixel_source(source, record.path, loaded.sources.features, geom.grid)
        result.files.append(write_gallery(out / "top_patches.png", pixels, drawing, tasks, top_k))
    return result


def _draw(out: Path, drawing: Drawing, scales: Sequence[Scale]) -> list[Path]:
    """heatmap.png, and for a volume the three slice PNGs (the first shown task's scale)."""
    files = [_overlay(out / "heatmap.png", drawing, scales)]
    if drawing.store.spatial_dims == 3:
        files += _slices_3d(out, drawing, scales[0])
    return files


def _scale_attrs(names: Sequence[str], show: Sequence[int], scales: Sequence[Scale]) -> dict:
    """`{task: {top, threshold, kind[, slides], legend}}`: the colour scale each shown task's PNG used."""
    return {names[t]: {**s.to_dict(), "legend": legend_text(s)} for t, s in zip(show, scales)}


def draw_overlays(result: HeatmapResult, store_path: str, scales: Sequence[Scale]) -> list[Path]:
    """The PNGs `write_slide_heatmaps(..., overlays=False)` left out, coloured by `scales` (one per shown
    task, e.g. one global scale for every slide drawn together), from the slide's scores.zarr: one
    slide's attention and coordinates in memory at a time. Records the scales in its attributes."""
    import zarr

    root = zarr.open_group(str(result.out_dir / SCORES), mode="r+")
    attrs = dict(root.attrs)
    level0 = np.asarray(root["level0_coords"][...], dtype=np.int64)
    geom = GridGeometry(
        grid=str(attrs["grid"]),
        level=int(attrs["level"]),
        coords=np.asarray(root["coords"][...], dtype=np.int64),
        level0=level0,
        size0=np.asarray(attrs["patch_size_level0"], dtype=np.int64),
        stride0=np.asarray(attrs["stride_level0"], dtype=np.int64),
    )
    drawing = Drawing(
        slide_id=result.slide_id,
        store=open_store(store_path),
        geom=geom,
        inf=StoredScores(np.asarray(root["attention"][...])),
        show=result.show,
        titles=result.titles,
        thumb_size=result.thumb_size,
    )
    files = _draw(result.out_dir, drawing, scales)
    root.attrs["colour_scales"] = _scale_attrs([str(n) for n in attrs["tasks"]], result.show, scales)
    result.files += files
    return files
