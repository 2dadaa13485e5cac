"""Per-patch scores as GeoJSON that QuPath imports (File > Import objects, or drag and drop).

One Feature per patch: a closed rectangular Polygon in level-0 pixel coordinates, `[x, y]` order as QuPath
(and OpenSlide) expect, `objectType` `detection` (light-weight objects; Measure > Show measurement maps
colours them by any measurement), `properties.measurements` `{name: value}` (QuPath >= 0.4) and, for the
patches the model selected (top-M), `properties.classification` `{"name": SELECTED_CLASS}`.

This module is the one place where our `(row, col)` coordinates become `(x, y)`.
Written feature by feature: memory stays O(1) per patch beyond the caller's O(N) score arrays.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

SELECTED_CLASS = "IPS selected"
SELECTED_COLOUR = [230, 30, 30]
_BLOCK = 4096  # features converted to Python objects at once


def boxes_xy(level0_rc: np.ndarray, size_rc: np.ndarray | tuple[int, int]) -> np.ndarray:
    """Patch rectangles in level-0 pixels, `(row, col)` corners -> `(x0, y0, x1, y1)`.

    Args:
        level0_rc: int `(N, 2)` top-left corners `(row, col)` in level-0 pixels.
        size_rc: `(2,)` patch size `(rows, cols)` in level-0 pixels.
    Returns:
        int64 `(N, 4)`: `x0 = col, y0 = row, x1 = col + cols, y1 = row + rows`.
    """
    rc = np.asarray(level0_rc, dtype=np.int64)
    if rc.ndim != 2 or rc.shape[1] != 2:
        raise ValueError(f"GeoJSON needs 2D coordinates (N, 2), got shape {rc.shape}")
    rows, cols = (int(v) for v in size_rc)
    return np.stack([rc[:, 1], rc[:, 0], rc[:, 1] + cols, rc[:, 0] + rows], axis=1)


def write_geojson(
    path: str | Path,
    level0_rc: np.ndarray,
    size_rc: np.ndarray | tuple[int, int],
    measurements: Mapping[str, np.ndarray],
    selected: np.ndarray | None = None,
) -> Path:
    """Write a FeatureCollection with one rectangle per patch; returns the path.

    Args:
        level0_rc: int `(N, 2)` top-left `(row, col)` in level-0 pixels.
        size_rc: patch size `(rows, cols)` in level-0 pixels.
        measurements: name -> `(N,)` values (e.g. `"lesion attention"`); finite floats.
        selected: bool `(N,)`: patches classified as `SELECTED_CLASS` (the top-M), or None.
    The file is written under a temporary name and renamed, so it is never seen half-written.
    """
    path = Path(path)
    boxes = boxes_xy(level0_rc, size_rc)
    n = len(boxes)
    cols = {name: np.asarray(v, dtype=np.float64).reshape(-1) for name, v in measurements.items()}
    for name, v in cols.items():
        if len(v) != n:
            raise ValueError(f"measurement {name!r} has {len(v)} values for {n} patches")
    sel = np.zeros(n, dtype=bool) if selected is None else np.asarray(selected, dtype=bool)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write('{"type": "FeatureCollection", "features": [\n')
        for start in range(0, n, _BLOCK):  # Python objects for one block at a time, not N
            rows = boxes[start : start + _BLOCK].tolist()
            for i, (x0, y0, x1, y1) in enumerate(rows, start):
                props: dict[str, object] = {
                    "objectType": "detection",
                    # 7 significant digits (float32 precision); JSON has no NaN: QuPath reads a missing
                    # measurement as NaN
                    "measurements": {
                        name: float(f"{v[i]:.7g}") for name, v in cols.items() if np.isfinite(v[i])
                    },
                }
                if sel[i]:
                    props["classification"] = {"name": SELECTED_CLASS, "color": SELECTED_COLOUR}
                feature = {
                    "type": "Feature",
                    "id": f"patch-{i}",
                    "geometry": {
                        "type": "Polygon",
                        "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
                    },
                    "properties": props,
                }
                f.write(("" if i == 0 else ",\n") + json.dumps(feature, separators=(",", ":")))
        f.write("\n]}\n")
    os.replace(tmp, path)
    return path
