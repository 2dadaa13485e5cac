"""Annotations drawn in the viewer: checked, and kept as one QuPath GeoJSON file per slide.

`DIR/<slide_id>.geojson` (DIR: `ips view --annotations DIR`) is a FeatureCollection of Polygons in the
source's level-0 pixels, `[x, y]` order (x = column), each with `properties.objectType` "annotation" and
`properties.classification` `{"name", "color"}`: the form QuPath imports and exports, and the form the
manifest's `annotation` column reads for annotation guidance (`ips.data.annotations`; polygons of the
class `NOT_REGION` are kept for the record and left out of the region).

Nothing is trusted: a body is parsed and rebuilt feature by feature (geometry numbers only, a class
name of printable text), bounded in size, and every vertex must lie on the slide. Writes are atomic (a
temporary file in DIR, flushed, then renamed over the old one) and go nowhere but `DIR/<safe id>.geojson`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ips.data.annotations import NOT_REGION_CLASSES

MAX_BODY = 8 << 20  # bytes of one upload
MAX_FEATURES = 5000
MAX_POINTS = 200_000  # vertices of one slide's annotations
CLASSES = {"Tumor": [200, 0, 0], NOT_REGION_CLASSES[0]: [20, 120, 220]}  # the page's choices and colours
DEFAULT_CLASS = "Tumor"
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
SAFE_NAME = re.compile(r"^[^\x00-\x1f\x7f]{1,64}$")


class AnnotationError(ValueError):
    """An upload that is not annotations of this slide (HTTP 400); the message says what is wrong."""


@dataclass(frozen=True)
class AnnotationFolder:
    """Where a viewer keeps its annotations: `root` (made at start; it must be a real folder)."""

    root: Path

    @classmethod
    def at(cls, path: str | Path) -> AnnotationFolder:
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        if root.is_symlink() or not root.is_dir():
            raise NotADirectoryError(f"--annotations {path}: not a folder")
        return cls(root.resolve())

    def path(self, slide_id: str) -> Path:
        if not SAFE_ID.match(slide_id):
            raise AnnotationError(
                f"slide id {slide_id[:40]!r} cannot name a file (letters, digits, . _ - only)"
            )
        return self.root / f"{slide_id}.geojson"

    def read(self, slide_id: str) -> dict[str, Any]:
        """The slide's FeatureCollection (empty when none was saved)."""
        path = self.path(slide_id)
        if path.is_symlink() or not path.is_file():
            return {"type": "FeatureCollection", "features": []}
        return json.loads(path.read_text(encoding="utf-8"))

    def write(self, slide_id: str, collection: dict[str, Any]) -> Path:
        """Replace the slide's file atomically; an empty collection removes it (guidance needs polygons)."""
        path = self.path(slide_id)
        if path.is_symlink():
            raise AnnotationError(f"{path.name} is a symlink; refused")
        if not collection["features"]:
            path.unlink(missing_ok=True)
            return path
        fd, tmp = tempfile.mkstemp(prefix=f".{slide_id}.", suffix=".tmp", dir=self.root)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(collection, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def parse_upload(body: bytes, extent: tuple[float, float]) -> dict[str, Any]:
    """An uploaded (or QuPath-exported) FeatureCollection, a list of Features or one Feature -> the clean
    FeatureCollection to store. `extent`: the slide's level-0 `(rows, cols)`. AnnotationError when it is
    not polygons on this slide."""
    if len(body) > MAX_BODY:
        raise AnnotationError(f"annotations over {MAX_BODY >> 20} MiB")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise AnnotationError(f"not JSON ({str(e)[:80]})") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        items = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        items = [data]
    else:
        items = data
    if not isinstance(items, list):
        raise AnnotationError("expected a GeoJSON FeatureCollection, a list of Features or a Feature")
    if len(items) > MAX_FEATURES:
        raise AnnotationError(f"{len(items)} features (at most {MAX_FEATURES})")
    budget = [MAX_POINTS]
    features = [_feature(item, k, extent, budget) for k, item in enumerate(items)]
    return {"type": "FeatureCollection", "features": [f for f in features if f is not None]}


def _feature(item: Any, k: int, extent: tuple[float, float], budget: list[int]) -> dict[str, Any] | None:
    """One clean Feature (None: a geometry without area, a point or line, which QuPath may export too)."""
    if not isinstance(item, dict) or not isinstance(item.get("geometry"), dict):
        raise AnnotationError(f"feature {k}: not a GeoJSON Feature with a geometry")
    geometry = item["geometry"]
    kind, coords = geometry.get("type"), geometry.get("coordinates")
    if kind not in ("Polygon", "MultiPolygon"):
        return None
    parts = [coords] if kind == "Polygon" else coords
    if not isinstance(parts, list) or not parts:
        raise AnnotationError(f"feature {k}: a {kind} without rings")
    clean = [[_ring(ring, k, extent, budget) for ring in _rings(rings, k)] for rings in parts]
    props = item.get("properties") if isinstance(item.get("properties"), dict) else {}
    cls = props.get("classification") if isinstance(props.get("classification"), dict) else {}
    name = cls.get("name", DEFAULT_CLASS)
    if not isinstance(name, str) or not SAFE_NAME.match(name):
        raise AnnotationError(f"feature {k}: class name must be 1-64 printable characters")
    color = cls.get("color", CLASSES.get(name, [120, 120, 120]))
    if not (
        isinstance(color, list)
        and len(color) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in color)
    ):
        color = CLASSES.get(name, [120, 120, 120])
    fid = item.get("id")
    out: dict[str, Any] = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": clean[0]}
        if len(clean) == 1
        else {"type": "MultiPolygon", "coordinates": clean},
        "properties": {"objectType": "annotation", "classification": {"name": name, "color": color}},
    }
    if isinstance(fid, str) and SAFE_NAME.match(fid):
        out["id"] = fid
    return out


def _rings(rings: Any, k: int) -> list[Any]:
    if not isinstance(rings, list) or not rings:
        raise AnnotationError(f"feature {k}: a polygon is not a list of rings")
    return rings


def _ring(ring: Any, k: int, extent: tuple[float, float], budget: list[int]) -> list[list[float]]:
    """A closed ring of `[x, y]` numbers on the slide (one pixel of slack for rounding)."""
    if not isinstance(ring, list) or not all(isinstance(p, list) and len(p) == 2 for p in ring):
        raise AnnotationError(f"feature {k}: a ring is not a list of [x, y] points")
    budget[0] -= len(ring)
    if budget[0] < 0:
        raise AnnotationError(f"more than {MAX_POINTS} vertices")
    points = []
    rows, cols = extent
    for x, y in ring:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y)):
            raise AnnotationError(f"feature {k}: a point is not two numbers")
        if not (-1 <= x <= cols + 1 and -1 <= y <= rows + 1):  # NaN fails these too
            raise AnnotationError(
                f"feature {k}: point ({x}, {y}) lies outside the slide ({cols:g} x {rows:g} px)"
            )
        points.append([round(float(x), 2), round(float(y), 2)])
    if len({tuple(p) for p in points}) < 3:
        raise AnnotationError(f"feature {k}: a ring of fewer than 3 distinct points encloses no area")
    if points[0] != points[-1]:
        points.append(points[0])  # GeoJSON rings are closed
    return points
