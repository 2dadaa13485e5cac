"""The viewer's routes (`ViewerApp.get`, plain data in and out, tested without sockets) and the HTTP layer
over them (`make_server`: request heads parsed by `http.server`, in memory; sockets in `ips.view.serving`).

Read-only unless started with an annotation folder (`ViewerApp(annotations=...)`, `ips view --annotations
DIR`): then `PUT /api/slides/<id>/annotations` saves that slide's polygons (`ips.view.annotating`), only
from the viewer's own pages: the Host must be one this server answers, an Origin header must be this
server's, `Sec-Fetch-Site` (when sent) same-origin, and the header `X-IPS-Token` must carry the token of
this run (`/api/session`; another site's page cannot read it). Every other method, and PUT without the
folder, gets 405. A request names a slide by id; ids, levels, axes, indices and tile positions
are looked up or range-checked, never joined into paths, so path traversal and unknown ids get 404 and a
request can only read the stores the viewer was started with (through `ips.view.reading`: no links).
A malformed request line gets 400; a Host header naming another host 421 (DNS rebinding); a store that
cannot be read 500, one line naming the slide, never a local path (the server's log has the full line).
Routes:

    /                                             index page (slides, predictions, labels)
    /slide/<id>                                   a slide's page
    /assets/<name>                                the page's files (a fixed list)
    /api/slides                                   the index as JSON
    /api/colormap                                 the overlay's colour map, RGBA (256, 4)
    /api/slides/<id>                              levels, spacing, predictions, heatmap summary
    /api/slides/<id>/tiles/<level>/<ty>_<tx>.<jpg|png>              2D tile
    /api/slides/<id>/tiles/<level>/<axis>/<index>/<ty>_<tx>.<fmt>   3D tile: plane `index` across `axis`
    /api/slides/<id>/overlay/<task>.png           2D attention at patch resolution
                                                  (?scale=slide|global&threshold=<log2 ratio to 1/N>)
    /api/slides/<id>/overlay/<task>/<axis>/<at0>.png                3D: the plane through level-0 `at0`
    /api/slides/<id>/mask.png                     tissue mask (2D)
    /api/slides/<id>/thumbnail.jpg                the coarsest level, small (the index)
    /api/slides/<id>/patch/<index>.jpg            one grid patch (the gallery)
    /api/slides/<id>/at/<r>_<c>[_<x>]             the patch under a level-0 point: scores and coordinates
    /api/session                                  {"writable": bool, "token": str | null}
    /api/worklist                                 `ips suggest`'s ranking of the served slides (--worklist)
    /api/slides/<id>/suggested                    the regions `ips suggest` outlined on the slide (GeoJSON)
    /api/slides/<id>/annotations                  the slide's annotations (GeoJSON; PUT replaces them)
    /api/slides/<id>/annotations.geojson          the same as a download (QuPath: File > Import objects)
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import json
import os
import re
import secrets
import socket
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import numpy as np

from ips.data.store import IpsStore
from ips.errors import StoreError, one_line
from ips.infer.scale import global_scale
from ips.view.annotating import MAX_BODY, SAFE_ID, AnnotationError, AnnotationFolder, parse_upload
from ips.view.catalog import SlideEntry, WorkItem
from ips.view.overlay import Scores, load_scores
from ips.view.reading import MAX_READ_BYTES, open_checked
from ips.view.serving import Limits, ViewerServer, bind
from ips.view.tiles import AXES, FORMATS, ByteLRU, SlideImage, TileError, encode

ASSETS = {
    "index.html": "text/html",
    "slide.html": "text/html",
    "viewer.js": "text/javascript",
    "index.js": "text/javascript",
    "viewer.css": "text/css",
}
DEFAULT_CACHE_MB = 64
OPEN_SLIDES = 8  # slides kept open (store + scores); older ones are reopened on demand
TOP_K = 12  # gallery patches per task
GALLERY_MAX = 256  # longest side of a gallery image
THUMB_SIZE = 128  # longest side of an index thumbnail (at most)
NUMBER = re.compile(r"^-?\d{1,12}$")
# an absolute local path left in a message (after the known stores' paths were replaced by their ids)
ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\"`:;,()<>]+/)+[^\s'\"`:;,()<>]*")
THRESHOLD_LIMIT = 16.0  # |log2 ratio| of an overlay's threshold (2^16 times uniform is past any peak)
LOGGED_MAX = 1000  # distinct failure lines logged; later repeats are not


@dataclass
class Response:
    status: int
    content_type: str
    body: bytes
    download: str | None = None  # a file name: sent as an attachment

    @staticmethod
    def json(value: Any, status: int = 200) -> Response:
        return Response(status, "application/json", json.dumps(value).encode())

    @staticmethod
    def error(status: int, message: str) -> Response:
        line = " ".join(message.split())  # one line, whatever the message held
        return Response(status, "text/plain; charset=utf-8", f"{status} {line}\n".encode())


class BadRequest(ValueError):
    """A malformed request (HTTP 400)."""


class NotFound(LookupError):
    """Nothing of that name (HTTP 404)."""


def _int(text: str) -> int:
    if not NUMBER.match(text):
        raise BadRequest(f"not an integer: {text[:20]!r}")
    return int(text)


@dataclass
class OpenSlide:
    image: SlideImage
    scores: Scores | None
    has_mask: bool


@dataclass
class _Scrubber:
    """Replaces the known stores' and heatmaps' local paths in messages by what the client may see."""

    names: list[tuple[str, str]] = field(default_factory=list)  # (path as text, replacement), longest first

    @classmethod
    def of(cls, catalog: dict[str, SlideEntry]) -> _Scrubber:
        pairs: dict[str, str] = {}
        for e in catalog.values():
            places = [(e.store, f"slide {e.slide_id!r}")]
            if e.heatmap is not None:
                places.append((str(e.heatmap), f"heatmap of {e.slide_id!r}"))
            for place, name in places:
                for text in {str(place), os.path.abspath(place), os.path.realpath(place)}:
                    pairs.setdefault(text.rstrip("/") or text, name)
        return cls(sorted(pairs.items(), key=lambda kv: -len(kv[0])))

    def __call__(self, message: str) -> str:
        for text, name in self.names:
            message = message.replace(text, name)
        return ABSOLUTE_PATH.sub("<path>", message)


class ViewerApp:
    """Everything the server answers, for the slides of `catalog` (slide_id -> SlideEntry). `log` gets one
    line per distinct failure (a store that cannot be read): the full message, local paths included."""

    def __init__(
        self,
        catalog: dict[str, SlideEntry],
        cache_bytes: int = DEFAULT_CACHE_MB << 20,
        log: Callable[[str], None] | None = None,
        *,
        annotations: AnnotationFolder | None = None,
        worklist: Sequence[WorkItem] = (),
    ) -> None:
        self.catalog = catalog
        self.worklist = {w.slide_id: w for w in worklist if w.slide_id in catalog}
        self.annotations = annotations
        self.token = secrets.token_urlsafe(24) if annotations is not None else None
        self.cache = ByteLRU(cache_bytes)
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._scrub = _Scrubber.of(catalog)
        self._open: OrderedDict[str, OpenSlide] = OrderedDict()
        self._opening: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._logged: set[str] = set()

    # -- slides -------------------------------------------------------------------------------------------

    def slide(self, slide_id: str) -> OpenSlide:
        entry = self.catalog.get(slide_id)
        if entry is None:
            raise NotFound(f"unknown slide {slide_id[:80]!r}")
        with self._lock:
            if slide_id in self._open:
                self._open.move_to_end(slide_id)
                return self._open[slide_id]
            opening = self._opening.setdefault(slide_id, threading.Lock())
        with opening:  # one opening per slide, however many requests for it arrive at once
            with self._lock:
                if slide_id in self._open:
                    return self._open[slide_id]
            opened = self._open_slide(entry)
            with self._lock:
                self._open[slide_id] = opened
                while len(self._open) > OPEN_SLIDES:
                    self._open.popitem(last=False)
        return opened

    def _open_slide(self, entry: SlideEntry) -> OpenSlide:
        name = f"slide {entry.slide_id!r}"
        store = open_checked(entry.store, name)
        image = SlideImage(store)
        scores = (
            load_scores(entry.heatmap / "scores.zarr", store, f"heatmap of {entry.slide_id!r}")
            if entry.heatmap is not None
            else None
        )
        return OpenSlide(image, scores, image.dims == 2 and _has_mask(store))

    def forget(self, slide_id: str) -> None:
        """Drop an opened slide (its store failed): the next request opens it again."""
        with self._lock:
            self._open.pop(slide_id, None)

    def index(self) -> list[dict[str, Any]]:
        return [
            {
                "id": e.slide_id,
                "label": e.label,
                "heatmap": e.heatmap is not None,
                "predictions": [p.to_dict() for p in e.predictions],
            }
            for e in self.catalog.values()
        ]

    def info(self, slide_id: str) -> dict[str, Any]:
        entry = self.catalog[slide_id] if slide_id in self.catalog else None
        opened = self.slide(slide_id)
        image, store = opened.image, opened.image.store
        mask = store.attrs.get("mask") or {}
        out: dict[str, Any] = {
            "id": slide_id,
            "dims": image.dims,
            "channels": store.channels,
            "dtype": str(image.dtype),
            "spacing": store.source_spacing,  # of a level-0 pixel of the source: the viewer's frame
            "tile_size": image.tile_size,
            "tile_format": "jpg"
            if image.dims == 2 and store.channels == 3 and image.window is None
            else "png",
            "levels": [
                {"shape": list(s), "downsample": list(d)} for s, d in zip(image.shapes, image.downsamples)
            ],
            "mask": {"downsample": _to_source(mask.get("downsample"), store)} if opened.has_mask else None,
            "label": entry.label if entry else "",
            "predictions": [p.to_dict() for p in entry.predictions] if entry else [],
            "heatmap": _heatmap_info(opened.scores) if opened.scores is not None else None,
            "worklist": {"rank": w.rank, "score": w.score, "regions": w.regions is not None}
            if (w := self.worklist.get(slide_id))
            else None,
        }
        return out

    # -- images -------------------------------------------------------------------------------------------

    def tile(self, slide_id: str, parts: list[str]) -> Response:
        """parts: [level, ty_tx.fmt] (2D) or [level, axis, index, ty_tx.fmt] (3D)."""
        image = self.slide(slide_id).image
        name, dot, fmt = parts[-1].rpartition(".") if parts else ("", "", "")
        if not dot or fmt not in FORMATS or name.count("_") != 1 or len(parts) not in (2, 4):
            raise NotFound("tile names are <ty>_<tx>.jpg or .png")
        ty, tx = (_int(v) for v in name.split("_"))
        level = _int(parts[0])
        axis = parts[1] if len(parts) == 4 else None
        index = _int(parts[2]) if len(parts) == 4 else 0
        if axis is not None and axis not in AXES:
            raise NotFound(f"axis {axis[:8]!r} is not one of z, y, x")
        key = ("tile", slide_id, level, axis, index, ty, tx, fmt)
        body = self.cache.get(key)
        if body is None:
            body = encode(image.to_rgb(image.region(level, axis, index, ty, tx)), fmt)
            self.cache.put(key, body)
        return Response(200, FORMATS[fmt], body)

    def overlay(self, slide_id: str, parts: list[str], query: str = "") -> Response:
        """parts: [<task>.png] (2D) or [task, axis, <at0>.png] (3D); query: `scale=slide|global` and
        `threshold=<log2 ratio to uniform>` (the colour scale, `ips.infer.scale`)."""
        opened = self.slide(slide_id)
        scores = opened.scores
        if (
            scores is None
            or not parts
            or not parts[-1].endswith(".png")
            or len(parts) != (1 if opened.image.dims == 2 else 3)
        ):
            raise NotFound("no such overlay")
        last = _int(parts[-1][:-4])
        task = last if len(parts) == 1 else _int(parts[0])
        axis = parts[1] if len(parts) == 3 else None
        if axis is not None and axis not in AXES:
            raise NotFound("axis must be z, y or x")
        if not 0 <= task < len(scores.tasks):
            raise NotFound(f"task {task} not in 0..{len(scores.tasks) - 1}")
        kind, threshold = _scale_query(query)
        key = ("overlay", slide_id, task, axis, last if axis else 0, kind, threshold)
        body = self.cache.get(key)
        if body is None:
            scale = scores.scale(task, kind, threshold)
            body = encode(scores.image(task, axis, last, scale), "png")
            self.cache.put(key, body)
        return Response(200, "image/png", body)

    def mask(self, slide_id: str) -> Response:
        opened = self.slide(slide_id)
        if not opened.has_mask:
            raise NotFound(f"slide {slide_id[:80]!r} has no 2D tissue mask")
        key = ("mask", slide_id)
        body = self.cache.get(key)
        if body is None:
            store = opened.image.store
            shape = store.group["mask"].shape
            if int(np.prod(shape, dtype=np.float64)) > MAX_READ_BYTES:
                raise StoreError(f"{store.name}: a tissue mask of shape {tuple(shape)} is too large to serve")
            m = np.asarray(store.read_small("mask")) > 0  # (y, x) at the mask's downsample: a small array
            rgba = np.zeros((*m.shape, 4), dtype=np.uint8)
            rgba[m] = (0, 170, 60, 90)  # tissue: translucent green
            rgba[~m] = (40, 40, 40, 110)  # background: grey
            body = encode(rgba, "png")
            self.cache.put(key, body)
        return Response(200, "image/png", body)

    def patch_image(self, slide_id: str, name: str) -> Response:
        """One grid patch by index, read at the coarsest level where it is still >= 32 px (<= GALLERY_MAX)."""
        opened = self.slide(slide_id)
        scores = opened.scores
        if scores is None or not name.endswith(".jpg"):
            raise NotFound("no such patch")
        index = _int(name[:-4])
        if not 0 <= index < scores.n_patches:
            raise NotFound(f"patch {index} not in 0..{scores.n_patches - 1}")
        key = ("patch", slide_id, index)
        body = self.cache.get(key)
        if body is None:
            body = encode(_read_patch(opened.image, scores.grid.level0[index], scores.grid.size0), "jpg")
            self.cache.put(key, body)
        return Response(200, "image/jpeg", body)

    def thumbnail(self, slide_id: str) -> Response:
        """The coarsest level (3D: its middle z-plane), at most `THUMB_SIZE` px on its longest side."""
        key = ("thumb", slide_id)
        body = self.cache.get(key)
        if body is None:
            image = self.slide(slide_id).image
            level = len(image.shapes) - 1
            shape = np.asarray(image.shapes[level], dtype=np.int64)
            if int(np.prod(shape[-2:], dtype=np.float64)) * 4 > MAX_READ_BYTES:
                raise NotFound(f"slide {slide_id[:80]!r} has no level small enough for a thumbnail")
            lo = np.zeros_like(shape)
            size = shape.copy()
            if image.dims == 3:  # the middle plane across z
                lo[0], size[0] = shape[0] // 2, 1
            region = image.regions.read(level, tuple(lo.tolist()), tuple(size.tolist()))
            rgb = image.to_rgb(region if image.dims == 2 else region[:, 0])  # (y, x, 3)
            step = max(1, -(-max(rgb.shape[:2]) // THUMB_SIZE))
            body = encode(np.ascontiguousarray(rgb[::step, ::step]), "jpg")
            self.cache.put(key, body)
        return Response(200, "image/jpeg", body)

    def at(self, slide_id: str, text: str) -> dict[str, Any]:
        """The patch under a level-0 point `r_c` (2D) or `z_r_c` (3D)."""
        opened = self.slide(slide_id)
        point = np.asarray([_int(v) for v in text.split("_")], dtype=np.int64)
        if opened.scores is None or len(point) != opened.image.dims:
            raise NotFound("no scores at that point")
        s = opened.scores
        i = s.grid.patch_at(point)
        if i < 0:
            return {"index": None}
        return {
            "index": i,
            "level0": s.grid.level0[i].tolist(),
            "size0": s.grid.size0.tolist(),
            "selected": bool(np.isin(i, s.selected)),
            "attention": {t: float(s.attention[i, k]) for k, t in enumerate(s.tasks)},
            "logit": {t: float(s.logit[i, k]) for k, t in enumerate(s.tasks)},
        }

    # -- annotations ----------------------------------------------------------------------------------------

    def _extent(self, slide_id: str) -> tuple[float, float]:
        image = self.slide(slide_id).image
        if image.dims != 2:
            raise NotFound("annotations are drawn on 2D slides")
        shape, ds = image.shapes[0], image.downsamples[0]
        return float(shape[0] * ds[0]), float(shape[1] * ds[1])

    def read_annotations(self, slide_id: str, download: bool = False) -> Response:
        self._extent(slide_id)
        data = None
        if self.annotations is not None and SAFE_ID.match(slide_id):  # other ids cannot have a file
            data = self.annotations.read(slide_id)
        r = Response.json(data or {"type": "FeatureCollection", "features": []})
        if download:  # the file name goes into a header: only ids that are safe there
            name = f"{slide_id}.geojson" if SAFE_ID.match(slide_id) else "annotations.geojson"
            r.content_type, r.download = "application/geo+json", name
        return r

    def suggested(self, slide_id: str) -> Response:
        """The regions `ips suggest` outlined on the slide (GeoJSON, checked like an upload), or none."""
        item = self.worklist.get(slide_id)
        empty: dict[str, Any] = {"type": "FeatureCollection", "features": []}
        if item is None or item.regions is None:
            return Response.json(empty)
        extent = self._extent(slide_id)
        try:
            with item.regions.open("rb") as f:
                body = f.read(MAX_BODY + 1)
            return Response.json(parse_upload(body, extent))
        except (OSError, AnnotationError) as e:
            self._log_once(f"{item.regions}: regions not shown ({one_line(e)})")
            return Response.json(empty)

    def put(self, raw_path: str, body: bytes) -> Response:
        """Save one slide's annotations (`PUT /api/slides/<id>/annotations`, body: GeoJSON); the caller
        has checked where the request came from. 400 for a body that is not polygons on the slide."""
        if self.annotations is None:
            return Response.error(405, "read-only viewer (start it with --annotations DIR to save)")
        parts = [unquote(p) for p in urlsplit(raw_path).path.split("/")[1:]]
        if len(parts) != 4 or parts[:2] != ["api", "slides"] or parts[3] != "annotations":
            return Response.error(405, "only /api/slides/<id>/annotations can be written")
        slide_id = parts[2]
        try:
            if slide_id not in self.catalog:
                raise NotFound(f"unknown slide {slide_id[:80]!r}")
            collection = parse_upload(body, self._extent(slide_id))
            path = self.annotations.write(slide_id, collection)
        except NotFound as e:
            return Response.error(404, str(e).strip("'\""))
        except AnnotationError as e:
            return Response.error(400, f"annotations of {slide_id[:80]!r}: {e}")
        except OSError as e:
            self._log_once(f"{self.annotations.root}: cannot save ({one_line(e)})")
            return Response.error(500, f"annotations of {slide_id[:80]!r} could not be saved")
        return Response.json({"saved": len(collection["features"]), "file": path.name})

    # -- routing ------------------------------------------------------------------------------------------

    def get(self, raw_path: str) -> Response:
        """Answer one GET. Unknown routes, ids and out-of-range requests: 404; malformed requests: 400; a
        store that cannot be read: 500 (404 when it is gone), one line without local paths."""
        try:
            return self._route(raw_path)
        except (NotFound, TileError) as e:
            return Response.error(404, self._scrub(str(e).strip("'\"")[:200]) or "not found")
        except BadRequest as e:
            return Response.error(400, self._scrub(str(e)))
        except Exception as e:  # noqa: BLE001 - a damaged or vanished store: one line, the server goes on
            return self._failed(raw_path, e)

    def _failed(self, raw_path: str, e: Exception) -> Response:
        """A request that raised: one line to the log (the full message, once per distinct line), one to
        the client (the slide's id, no local path)."""
        parts = urlsplit(raw_path).path.split("/")
        slide_id = unquote(parts[3]) if len(parts) > 3 and parts[1:3] == ["api", "slides"] else None
        entry = self.catalog.get(slide_id) if slide_id is not None else None
        if entry is None:
            self._log_once(one_line(e))
            return Response.error(500, f"cannot answer ({self._scrub(one_line(e))})")
        self.forget(entry.slide_id)
        name = f"slide {entry.slide_id!r}"
        if _gone(entry.store):
            self._log_once(f"{entry.store}: store missing (deleted or moved)")
            return Response.error(
                404, f"{name}: its store is missing (deleted or moved since `ips view` started)"
            )
        reason = one_line(e).removeprefix(f"{name}: ").removeprefix(f"{entry.store}: ")
        self._log_once(f"{entry.store}: {reason}")  # the operator's log: the path is theirs to see
        return Response.error(500, f"{name} cannot be read: {self._scrub(reason)}")

    def _log_once(self, line: str) -> None:
        with self._lock:
            if line in self._logged or len(self._logged) >= LOGGED_MAX:
                return
            self._logged.add(line)
        self.log(f"ips view: {line}")

    def _route(self, raw_path: str) -> Response:
        if not raw_path.startswith("/"):
            raise BadRequest("the request target must be a path starting with '/'")
        split = urlsplit(raw_path)
        path, query = split.path, split.query
        parts = [unquote(p) for p in path.split("/")[1:]]
        if any(p in ("", ".", "..") or "/" in p or "\\" in p or "\0" in p for p in parts) and path != "/":
            raise NotFound("no such path")
        if path == "/":
            return _asset("index.html")
        if path == "/favicon.ico":
            return Response(204, "image/x-icon", b"")
        head, rest = parts[0], parts[1:]
        if head == "assets" and len(rest) == 1:
            return _asset(rest[0])
        if head == "slide" and len(rest) == 1:
            if rest[0] not in self.catalog:
                raise NotFound(f"unknown slide {rest[0][:80]!r}")
            return _asset("slide.html")
        if head != "api" or not rest:
            raise NotFound("no such page")
        if rest == ["slides"]:
            return Response.json(self.index())
        if rest == ["worklist"]:
            return Response.json(
                [
                    {"id": w.slide_id, "score": w.score, "rank": w.rank, "regions": w.regions is not None}
                    for w in sorted(self.worklist.values(), key=lambda w: w.rank)
                ]
            )
        if rest == ["session"]:
            return Response.json({"writable": self.annotations is not None, "token": self.token})
        if rest == ["colormap"]:
            from ips.infer.scale import colour_table

            return Response.json(np.rint(colour_table() * 255).astype(int).tolist())
        if rest[0] != "slides" or len(rest) < 2:
            raise NotFound("no such route")
        slide_id, what, args = rest[1], rest[2] if len(rest) > 2 else None, rest[3:]
        routes: dict[str | None, Callable[[], Response]] = {
            None: lambda: Response.json(self.info(slide_id)),
            "tiles": lambda: self.tile(slide_id, args),
            "overlay": lambda: self.overlay(slide_id, args, query),
            "mask.png": lambda: self.mask(slide_id),
            "patch": lambda: self.patch_image(slide_id, args[0]) if len(args) == 1 else _missing(),
            "at": lambda: Response.json(self.at(slide_id, args[0])) if len(args) == 1 else _missing(),
            "annotations": lambda: self.read_annotations(slide_id),
            "thumbnail.jpg": lambda: self.thumbnail(slide_id),
            "suggested": lambda: self.suggested(slide_id),
            "annotations.geojson": lambda: self.read_annotations(slide_id, download=True),
        }
        if what not in routes or (
            what in (None, "mask.png", "annotations", "annotations.geojson", "thumbnail.jpg", "suggested")
            and args
        ):
            raise NotFound("no such route")
        if slide_id not in self.catalog:
            raise NotFound(f"unknown slide {slide_id[:80]!r}")
        return routes[what]()


def _missing() -> Response:
    raise NotFound("no such route")


def _has_mask(store: IpsStore) -> bool:
    try:
        store.group["mask"]
    except KeyError:
        return False
    return True


def _gone(store: str) -> bool:
    """True when a local store's folder or completion marker is no longer there."""
    if "://" in store:
        return False
    from ips.format import names as sf

    return not (Path(store) / sf.COMPLETE_MARKER).is_file()


def _asset(name: str) -> Response:
    if name not in ASSETS:
        raise NotFound("no such asset")
    body = resources.files("ips.view").joinpath("assets", name).read_bytes()
    return Response(200, f"{ASSETS[name]}; charset=utf-8", body)


def _heatmap_info(s: Scores) -> dict[str, Any]:
    g = s.grid
    tasks = []
    for t, name in enumerate(s.tasks):
        top = s.top(t, TOP_K)
        peak = g.level0[top[0]] + g.size0 // 2 if len(top) else np.zeros_like(g.size0)
        tasks.append(
            {
                "name": name,
                "scale": s.scale(t).to_dict(),  # per slide, threshold 0 (the page may change both)
                "peak0": peak.tolist(),
                "top": [
                    {"index": int(i), "level0": g.level0[i].tolist(), "attention": float(s.attention[i, t])}
                    for i in top
                ],
            }
        )
    return {
        "tasks": tasks,
        "global_scale": global_scale().to_dict(),
        "n_patches": s.n_patches,
        "origin0": g.origin0.tolist(),
        "stride0": g.stride0.tolist(),
        "size0": g.size0.tolist(),
        "shape": list(g.shape),
        "selected": g.level0[s.selected].tolist(),
        "mode": s.attrs.get("mode"),
        "probabilities": s.attrs.get("probabilities"),
    }


def _scale_query(query: str) -> tuple[str, float]:
    """`scale=slide|global&threshold=T` -> (kind, threshold rounded to 0.01); BadRequest when malformed."""
    kind, threshold = "slide", 0.0
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "scale":
            if value not in ("slide", "global"):
                raise BadRequest("scale must be 'slide' or 'global'")
            kind = value
        elif name == "threshold":
            try:
                threshold = round(float(value), 2)
            except ValueError:
                raise BadRequest(f"threshold is not a number: {value[:20]!r}") from None
            if not -THRESHOLD_LIMIT <= threshold <= THRESHOLD_LIMIT:
                raise BadRequest(
                    f"threshold must lie in -{THRESHOLD_LIMIT}..{THRESHOLD_LIMIT} (log2 of a ratio)"
                )
    return kind, threshold


def _read_patch(image: SlideImage, level0: np.ndarray, size0: np.ndarray) -> np.ndarray:
    """uint8 `(h, w, 3)` of one patch (3D: its middle plane across z) at a level where it fits GALLERY_MAX."""
    level = 0
    for k, d in enumerate(image.downsamples):
        if max(size0[-2:] / np.asarray(d[-2:])) >= 32:
            level = k
    d = np.asarray(image.downsamples[level])
    shape = np.asarray(image.shapes[level], dtype=np.int64)
    lo = np.clip((level0 // d).astype(np.int64), 0, shape - 1)
    hi = np.maximum(((level0 + size0) // d).astype(np.int64), lo + 1)
    hi = np.minimum(np.minimum(hi, lo + GALLERY_MAX), shape)
    if image.dims == 3:  # the middle plane across z
        lo[0] = (lo[0] + hi[0]) // 2
        hi[0] = lo[0] + 1
    region = image.regions.read(level, tuple(lo.tolist()), tuple((hi - lo).tolist()))
    return image.to_rgb(region if image.dims == 2 else region[:, 0])


# -- HTTP -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostCheck:
    """Which Host headers the server answers (DNS rebinding: a page of another site whose name now points
    at this machine must not read the slides). Names are compared without their port (an SSH tunnel
    may forward another port): `localhost` and IP literals of this machine's loopback always; the bound
    address and the `extra` names; when bound to a non-loopback address, also this machine's host names
    and any IP literal (a rebinding attack needs a name it controls). No Host header (HTTP/1.0 tools) is
    answered too."""

    names: frozenset[str]
    any_ip: bool

    @classmethod
    def for_address(cls, host: str, extra: Iterable[str] = ()) -> HostCheck:
        names = {"localhost", host.lower().strip("[]").rstrip("."), *(n.lower().rstrip(".") for n in extra)}
        local = is_loopback(host)
        if not local:
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        return cls(frozenset(names), any_ip=not local)

    def allows(self, header: str | None) -> bool:
        if header is None:
            return True
        text = header.strip().lower()
        if text.startswith("["):  # [v6]:port
            name = text[1 : text.find("]")] if "]" in text else ""
        else:
            name = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
        name = name.rstrip(".")
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            return bool(name) and name in self.names
        return ip.is_loopback or self.any_ip or name in self.names


@dataclass(frozen=True)
class Site:
    """What the in-memory handler needs: the routes, the Host check, and whether to log each request."""

    app: ViewerApp
    hosts: HostCheck
    quiet: bool = True


CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'"


class _Exchange(BaseHTTPRequestHandler):
    """One request answered in memory: `head` (request line and headers) in, `.answer` (the whole
    response) out. `http.server` parses the head (and answers a malformed one 400 or 431); no socket is
    touched here, so a client that goes away cannot raise in this thread."""

    server_version = "ips-view"
    sys_version = ""
    protocol_version = "HTTP/1.0"
    default_request_version = "HTTP/1.0"  # a request line without a version is answered with a status line

    def __init__(self, head: bytes, peer: tuple[str, int], site: Site) -> None:  # no socket: not super()
        self.rfile = io.BytesIO(head)
        self.wfile = io.BytesIO()
        self.client_address = peer
        self.site = site
        self.close_connection = True
        self.command, self.requestline, self.request_version = "", "", self.default_request_version
        self.handle_one_request()
        if not self.wfile.getvalue():  # an empty request line: nothing was answered
            self.send_error(HTTPStatus.BAD_REQUEST, "empty request line")

    def version_string(self) -> str:
        return self.server_version

    @property
    def answer(self) -> bytes:
        return self.wfile.getvalue()

    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        self._answer(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(send_body=False)

    def _refuse(self) -> None:
        writable = self.site.app.annotations is not None
        self.send_error(
            HTTPStatus.METHOD_NOT_ALLOWED,
            "only GET, HEAD and PUT of annotations" if writable else "read-only viewer (no --annotations)",
        )

    do_POST = do_DELETE = do_PATCH = do_OPTIONS = _refuse  # noqa: N815

    def do_PUT(self) -> None:  # noqa: N802
        app = self.site.app
        if app.annotations is None:
            return self._refuse()
        refused = self._foreign()
        if refused:
            return self._send(Response.error(403, refused))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        self._send(app.put(self.path, body))

    def _foreign(self) -> str | None:
        """Why a write does not come from this viewer's own page (None: it does)."""
        host = self.headers.get("Host")
        if not host or not self.site.hosts.allows(host):
            return "this viewer does not answer to that Host name"
        origin = self.headers.get("Origin")
        if origin is not None and origin.lower().rstrip("/") != f"http://{host.lower()}":
            return "a write from another origin is refused"
        if self.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            return "a write from another site is refused"
        token = self.headers.get("X-IPS-Token") or ""
        if not hmac.compare_digest(token.encode(), (self.site.app.token or "").encode()):
            return "missing or wrong X-IPS-Token (reload the page)"
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            return "annotations are sent as application/json"
        return None

    def _answer(self, send_body: bool) -> None:
        if not self.site.hosts.allows(self.headers.get("Host")):
            r = Response.error(421, "this viewer does not answer to that Host name (DNS rebinding guard)")
        else:
            r = self.site.app.get(self.path)
        self._send(r, send_body, cache="private, max-age=3600" if "/tiles/" in self.path else "no-cache")

    def _send(self, r: Response, send_body: bool = True, cache: str = "no-cache") -> None:
        self.send_response(r.status)
        self.send_header("Content-Type", r.content_type)
        self.send_header("Content-Length", str(len(r.body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Cache-Control", cache)
        if r.download:
            self.send_header("Content-Disposition", f'attachment; filename="{r.download}"')
        self.end_headers()
        if send_body:
            self.wfile.write(r.body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """A one-line text body (not http.server's HTML page)."""
        status = HTTPStatus(code)
        self.close_connection = True
        self._send(Response.error(status.value, message or status.phrase), self.command != "HEAD")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if not self.site.quiet:
            line = format % args
            print(f"{self.client_address[0]} {line}", file=sys.stderr, flush=True)


def make_server(
    app: ViewerApp,
    host: str = "127.0.0.1",
    port: int = 0,
    quiet: bool = True,
    *,
    allow_hosts: Iterable[str] = (),
    limits: Limits | None = None,
) -> ViewerServer:
    """A server for `app` bound to (host, port) (port 0: any free one), listening, not yet serving
    (`serve_forever`). `allow_hosts`: further Host names to answer (a reverse proxy's); `limits`: workers,
    connections, timeouts. Raises OSError (address in use, unknown host)."""
    site = Site(app, HostCheck.for_address(host, allow_hosts), quiet)

    def handle(head: bytes, peer: tuple[str, int]) -> bytes:
        return _Exchange(head, peer, site).answer

    if limits is None:
        limits = Limits(max_body=MAX_BODY if app.annotations is not None else 0)
    return ViewerServer(bind(host, port), handle, limits=limits, log=app.log)


def is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def url_of(server: ViewerServer) -> str:
    host, port = server.server_address[:2]
    host = str(host)
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def asset_path(name: str) -> Path:
    """Where an asset lives (for tests)."""
    return Path(str(resources.files("ips.view").joinpath("assets", name)))


def _to_source(downsample: list[float] | None, store: IpsStore) -> list[float] | None:
    """A downsample from the store's level 0 as one from the source's level 0 (`--store-from grid`)."""
    if downsample is None:
        return None
    return [float(d) * float(s) for d, s in zip(downsample, store.source_downsample)]
