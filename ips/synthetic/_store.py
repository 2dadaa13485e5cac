"""Writing generated images as ips stores, with ground truth beside the format's own arrays, and manifests.

Truth lives in the store under `ips_truth/` (a name outside docs/FORMAT.md, so readers ignore it):
per-patch float32 arrays `ips_truth/<name>` `(N,)` aligned with `grids/default/coords` (and
`ips_truth/<grid>/<name>` for any further grid, `truth_key`), and the group's attributes (planted
objects, labels). It is added before the store becomes visible: the writer builds the
complete store in a staging folder, the truth is added there, and the store contract's commit
(`ips.format.store.commit`) records it in the marker and renames the folder into place.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zarr

from ips.format import names as sf
from ips.format.store import commit, read_marker

TRUTH_GROUP = "ips_truth"
STAGING = ".staging"


def grid_share(
    mask: np.ndarray, coords: np.ndarray, patch: Sequence[int], factor: Sequence[int]
) -> np.ndarray:
    """Share of each grid patch inside the level-0 `mask` `(Y, X)` / `(Z, Y, X)` -> `(N,)` float32.

    `coords` `(N, d)`: the patches' corners in pixels of their level, whose downsample to level 0 is
    `factor`; `patch`: the patch size in those pixels. A grid's patches lie inside the image and on a
    product of per-axis starts, so this is `data_prep.grid.tissue_fractions` (the prep's exact
    summed-area fractions) on those starts: the one "share of a patch inside a mask" of the project.
    """
    from data_prep.grid import tissue_fractions  # optional at import time

    coords = np.asarray(coords, dtype=np.int64).reshape(-1, mask.ndim)
    if len(coords) == 0:
        return np.zeros(0, np.float32)
    starts = [np.unique(coords[:, a]) for a in range(mask.ndim)]
    frac = tissue_fractions(mask, starts, tuple(float(p) for p in patch), tuple(float(f) for f in factor))
    return frac[tuple(np.searchsorted(st, coords[:, a]) for a, st in enumerate(starts))]


class GridSpec(NamedTuple):
    """A further grid for a generated store: `patch_size` / `stride` in pixels of pyramid `level`."""

    name: str
    level: int
    patch_size: int
    stride: int

    @classmethod
    def parse(cls, text: str) -> GridSpec:
        """`NAME:LEVEL:PATCH:STRIDE`, e.g. `halo:1:38:24` (ValueError naming the text otherwise)."""
        parts = text.split(":")
        try:
            if len(parts) != 4 or not parts[0]:
                raise ValueError
            spec = cls(parts[0], *(int(x) for x in parts[1:]))
        except ValueError:
            raise ValueError(f"grid {text!r}: expected NAME:LEVEL:PATCH:STRIDE, e.g. halo:1:38:24") from None
        if spec.name == sf.DEFAULT_GRID or spec.level < 0 or spec.patch_size < 1 or spec.stride < 1:
            raise ValueError(
                f"grid {text!r}: the name must not be {sf.DEFAULT_GRID!r}, the level >= 0, "
                "patch and stride >= 1"
            )
        return spec


def truth_key(name: str, grid: str = sf.DEFAULT_GRID) -> str:
    """Path in a store of truth `name` of grid `grid`: `ips_truth/<name>` for the default grid (the
    layout every generated store has), `ips_truth/<grid>/<name>` for a further grid."""
    return f"{TRUTH_GROUP}/{name}" if grid == sf.DEFAULT_GRID else f"{TRUTH_GROUP}/{grid}/{name}"


def _write_truth(truth: Any, name: str, grid: str, values: np.ndarray) -> None:
    """`values` `(N,)` as truth `name` of `grid` in the `ips_truth` group `truth` (at `truth_key`)."""
    group = truth if grid == sf.DEFAULT_GRID else truth.require_group(grid)
    arr = group.create_array(
        name, shape=values.shape, dtype="float32", chunks=(max(1, len(values)),), fill_value=0.0
    )
    if len(values):
        arr[...] = values


def write_store(
    array: np.ndarray,
    out_dir: str | Path,
    slide_id: str,
    *,
    patch_size: int,
    background: int,
    mask: np.ndarray | None,
    min_tissue: float,
    spacing: tuple[float, ...] | None = None,
    truth_masks: Mapping[str, np.ndarray] | None = None,
    truth_attrs: Mapping[str, Any] | None = None,
    extra_grids: Sequence[GridSpec] = (),
) -> Path:
    """Write `array` `(C, Y, X)` / `(C, Z, Y, X)` uint8 as `out_dir/<slide_id>.zarr` with grid `default`
    (`patch_size` at stride `patch_size` on level 0) and the `extra_grids`; returns the store's path.

    Truth: `truth_masks` (name -> level-0 mask `(Y, X)` / `(Z, Y, X)`, bool or float) becomes, for every
    grid, the share of each patch inside the mask (`grid_share`), `(N,)` at `truth_key(name, grid)`;
    `truth_attrs` the `ips_truth` group's attributes. The store is built in `out_dir/.staging/` and made
    complete by the store contract's commit (`ips.format.store.commit`: its marker records the truth too,
    then one rename into place).
    """
    # optional at import time
    from data_prep.convert import THUMBNAIL_SUFFIX, PrepOptions, add_grid, convert_array

    out_dir = Path(out_dir)
    staging = out_dir / STAGING
    # overwrite: a store left in staging by a killed run may come from other parameters
    options = PrepOptions(
        patch_size=patch_size,
        stride=patch_size,
        level=0,
        min_tissue=min_tissue,
        grid_name=sf.DEFAULT_GRID,
        overwrite=True,
    )
    deepest = max((g.level for g in extra_grids), default=0)
    if deepest:  # the pyramid must reach the extra grids' levels (by default it stops at <= 512 px)
        side = max(array.shape[-2:]) >> deepest
        options = dataclasses.replace(options, pyramid_max_size=max(1, min(options.pyramid_max_size, side)))
    built = Path(
        convert_array(
            array, staging, slide_id, spacing=spacing, options=options, background=background, mask=mask
        )
    )
    for spec in extra_grids:
        add_grid(
            built,
            dataclasses.replace(
                options,
                patch_size=spec.patch_size,
                stride=spec.stride,
                level=spec.level,
                grid_name=spec.name,
                allow_empty=True,
            ),
        )
    grids = [sf.DEFAULT_GRID, *(g.name for g in extra_grids)]
    _add_truth(built, grids, truth_masks or {}, truth_attrs or {})
    final = commit(built, out_dir / f"{slide_id}.zarr", grids, known=_recorded(built))
    thumb = staging / f"{slide_id}{THUMBNAIL_SUFFIX}"
    if thumb.is_file():  # the store's attributes point at ../<slide_id>.thumbnail.png
        os.replace(thumb, out_dir / thumb.name)
    if not any(staging.iterdir()):
        staging.rmdir()
    return final


def _recorded(store: Path) -> dict[str, Any]:
    """What the staged store's marker records already (its checksums need not be computed again)."""
    marker = read_marker(store)
    return dict(marker.arrays or {}) if marker is not None else {}


def _add_truth(
    store: Path, grids: Sequence[str], masks: Mapping[str, np.ndarray], attrs: Mapping[str, Any]
) -> None:
    """The `ips_truth` group of a staged store: `attrs`, and per grid and mask the share of each patch
    inside the mask."""
    root = zarr.open_group(str(store), mode="r+")
    truth = root.create_group(TRUTH_GROUP, overwrite=True)
    truth.attrs.update(dict(attrs))
    factors = root.attrs[sf.IPS_ATTR]["level_downsamples"]
    for grid in grids:
        info = root[f"{sf.GRIDS_GROUP}/{grid}"].attrs
        coords = root[f"{sf.GRIDS_GROUP}/{grid}/{sf.COORDS_ARRAY}"][...]
        for name, mask in masks.items():
            share = grid_share(np.asarray(mask), coords, info["patch_size"], factors[info["level"]])
            _write_truth(truth, name, grid, share)


def write_manifest(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Write a manifest CSV with `columns` (missing cells empty); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    os.replace(tmp, path)
    return path


def stratified_splits(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[str]:
    """A split name (train/val/test) per item, the same share of each label in every split.

    Within each label, items are shuffled with `seed` and cut at the cumulative `fractions`.
    """
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(
            f"split fractions must be 3 non-negative numbers (train, val, test), got {fractions}"
        )
    frac = np.asarray(fractions, dtype=float) / float(sum(fractions))
    rng = np.random.default_rng([seed, 0x5350])
    labels_arr = np.asarray(labels)
    out = [""] * len(labels_arr)
    for lab in np.unique(labels_arr):
        idx = rng.permutation(np.flatnonzero(labels_arr == lab))
        cuts = np.round(np.cumsum(frac)[:-1] * len(idx)).astype(int)
        for name, part in zip(("train", "val", "test"), np.split(idx, cuts)):
            for i in part:
                out[int(i)] = name
    return out
