"""The viewer's routes (`ViewerApp.get`, plain data in and out, tested without sockets) and the HTTP server.

Read-only: GET and HEAD only. A request names a slide by id; ids, levels, axes, indices and tile positions
are looked up or range-checked, never joined into paths, so path traversal and unknown ids get 404 and a
request can only read the stores the viewer was started with. Routes:

    /                                             index page (slides, predictions, labels)
    /slide/<id>                                   a slide's page
    /assets/<name>                                the page's files (a fixed list)
    /api/slides                                   the index as JSON
    /api/colormap                                 the overlay's colour map, RGBA (256, 4)
    /api/slides/<id>                              levels, spacing, predictions, heatmap summary
    /api/slides/<id>/tiles/<level>/<ty>_<tx>.<jpg|png>              2D tile
    /api/slides/<id>/tiles/<level>/<axis>/<index>/<ty>_<tx>.<fmt>   3D tile: plane `index` across `axis`
    /api/slides/<id>/overlay/<task>.png           2D attention at patch resolution
    /api/slides/<id>/overlay/<task>/<axis>/<at0>.png                3D: the plane through level-0 `at0`
    /api/slides/<id>/mask.png                     tissue mask (2D)
    /api/slides/<id>/patch/<index>.jpg            one grid patch (the gallery)
    /api/slides/<id>/at/<r>_<c>[_<x>]             the patch under a level-0 point: scores and coordinates
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from ips.data.store import IpsStore, open_store
from ips.errors import StoreError
from ips.view.catalog import SlideEntry
from ips.view.overlay import Scores, load_scores
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
NUMBER = re.compile(r"^-?\d{1,12}$")


@dataclass
class Response:
    status: int
    content_type: str
    body: bytes

    @staticmethod
    def json(value: Any, status: int = 200) -> Response:
        return Response(status, "application/json", json.dumps(value).encode())

    @staticmethod
    def error(status: int, message: str) -> Response:
        return Response(status, "text/plain; charset=utf-8", f"{status} {message}\n".encode())


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


class ViewerApp:
    """Everything the server answers, for the slides of `catalog` (slide_id -> SlideEntry)."""

    def __init__(self, catalog: dict[str, SlideEntry], cache_bytes: int = DEFAULT_CACHE_MB << 20) -> None:
        self.catalog = catalog
        self.cache = ByteLRU(cache_bytes)
        self._open: OrderedDict[str, OpenSlide] = OrderedDict()
        self._lock = threading.Lock()

    # -- slides -------------------------------------------------------------------------------------------

    def slide(self, slide_id: str) -> OpenSlide:
        entry = self.catalog.get(slide_id)
        if entry is None:
            raise NotFound(f"unknown slide {slide_id[:80]!r}")
        with self._lock:
            if slide_id in self._open:
                self._open.move_to_end(slide_id)
                return self._open[slide_id]
        store = open_store(entry.store)
        scores = load_scores(entry.heatmap / "scores.zarr", store) if entry.heatmap is not None else None
        opened = OpenSlide(SlideImage(store), scores)
        with self._lock:
            self._open[slide_id] = opened
            while len(self._open) > OPEN_SLIDES:
                self._open.popitem(last=False)
        return opened

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
            "mask": {"downsample": _to_source(mask.get("downsample"), store)}
            if image.dims == 2 and "mask" in _members(store)
            else None,
            "label": entry.label if entry else "",
            "predictions": [p.to_dict() for p in entry.predictions] if entry else [],
            "heatmap": _heatmap_info(opened.scores) if opened.scores is not None else None,
        }
        return out

    # -- images -------------------------------------------------------------------------------------------

    def tile(self, slide_id: str, parts: list[str]) -> Response:
        """parts: [level, ty_tx.fmt] (2D) or [level, axis, index, ty_tx.fmt] (3D)."""
        image = self.slide(slide_id).image
        name, dot, fmt = parts[-1].rpartition(".")
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

    def overlay(self, slide_id: str, parts: list[str]) -> Response:
        """parts: [<task>.png] (2D) or [task, axis, <at0>.png] (3D)."""
        opened = self.slide(slide_id)
        scores = opened.scores
        if (
            scores is None
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
        key = ("overlay", slide_id, task, axis, last if axis else 0)
        body = self.cache.get(key)
        if body is None:
            body = encode(scores.image(task, axis, last), "png")
            self.cache.put(key, body)
        return Response(200, "image/png", body)

    def mask(self, slide_id: str) -> Response:
        store = self.slide(slide_id).image.store
        if store.spatial_dims != 2 or "mask" not in _members(store):
            raise NotFound("no 2D tissue mask")
        key = ("mask", slide_id)
        body = self.cache.get(key)
        if body is None:
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
            body = encode(_read_patch(opened.image, scores.level0[index], scores.size0), "jpg")
            self.cache.put(key, body)
        return Response(200, "image/jpeg", body)

    def at(self, slide_id: str, text: str) -> dict[str, Any]:
        """The patch under a level-0 point `r_c` (2D) or `z_r_c` (3D)."""
        opened = self.slide(slide_id)
        point = np.asarray([_int(v) for v in text.split("_")], dtype=np.int64)
        if opened.scores is None or len(point) != opened.image.dims:
            raise NotFound("no scores at that point")
        s = opened.scores
        i = s.patch_at(point)
        if i < 0:
            return {"index": None}
        return {
            "index": i,
            "level0": s.level0[i].tolist(),
            "size0": s.size0.tolist(),
            "selected": bool(np.isin(i, s.selected)),
            "attention": {t: float(s.attention[i, k]) for k, t in enumerate(s.tasks)},
            "logit": {t: float(s.logit[i, k]) for k, t in enumerate(s.tasks)},
        }

    # -- routing ------------------------------------------------------------------------------------------

    def get(self, raw_path: str) -> Response:
        """Answer one GET. Unknown routes, ids and out-of-range requests: 404; malformed numbers: 400."""
        try:
            return self._route(raw_path)
        except (NotFound, TileError, KeyError) as e:
            return Response.error(404, str(e).strip("'\"")[:200] or "not found")
        except BadRequest as e:
            return Response.error(400, str(e))
        except StoreError as e:
            return Response.error(500, f"store error: {e}")

    def _route(self, raw_path: str) -> Response:
        path = urlsplit(raw_path).path
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
        if rest == ["colormap"]:
            from ips.infer.render import overlay_colors

            return Response.json(np.rint(overlay_colors() * 255).astype(int).tolist())
        if rest[0] != "slides" or len(rest) < 2:
            raise NotFound("no such route")
        slide_id, what, args = rest[1], rest[2] if len(rest) > 2 else None, rest[3:]
        routes: dict[str | None, Callable[[], Response]] = {
            None: lambda: Response.json(self.info(slide_id)),
            "tiles": lambda: self.tile(slide_id, args),
            "overlay": lambda: self.overlay(slide_id, args),
            "mask.png": lambda: self.mask(slide_id),
            "patch": lambda: self.patch_image(slide_id, args[0]) if len(args) == 1 else _missing(),
            "at": lambda: Response.json(self.at(slide_id, args[0])) if len(args) == 1 else _missing(),
        }
        if what not in routes or (what in (None, "mask.png") and args):
            raise NotFound("no such route")
        if slide_id not in self.catalog:
            raise NotFound(f"unknown slide {slide_id[:80]!r}")
        return routes[what]()


def _missing() -> Response:
    raise NotFound("no such route")


def _members(store: IpsStore) -> set[str]:
    try:
        store.group["mask"]
        return {"mask"}
    except KeyError:
        return set()


def _asset(name: str) -> Response:
    if name not in ASSETS:
        raise NotFound("no such asset")
    body = resources.files("ips.view").joinpath("assets", name).read_bytes()
    return Response(200, f"{ASSETS[name]}; charset=utf-8", body)


def _heatmap_info(s: Scores) -> dict[str, Any]:
    tasks = []
    for t, name in enumerate(s.tasks):
        top = s.top(t, TOP_K)
        peak = s.level0[top[0]] + s.size0 // 2 if len(top) else np.zeros_like(s.size0)
        tasks.append(
            {
                "name": name,
                "vmax": s.vmax(t),
                "peak0": peak.tolist(),
                "top": [
                    {"index": int(i), "level0": s.level0[i].tolist(), "attention": float(s.attention[i, t])}
                    for i in top
                ],
            }
        )
    return {
        "tasks": tasks,
        "n_patches": s.n_patches,
        "origin0": s.origin0.tolist(),
        "stride0": s.stride0.tolist(),
        "size0": s.size0.tolist(),
        "shape": list(s.shape),
        "selected": s.level0[s.selected].tolist(),
        "mode": s.attrs.get("mode"),
        "probabilities": s.attrs.get("probabilities"),
    }


def _read_patch(image: SlideImage, level0: np.ndarray, size0: np.ndarray) -> np.ndarray:
    """uint8 `(h, w, 3)` of one patch (3D: its middle plane across z) at a level where it fits GALLERY_MAX."""
    level = 0
    for k, d in enumerate(image.downsamples):
        if max(size0[-2:] / np.asarray(d[-2:])) >= 32:
            level = k
    d = np.asarray(image.downsamples[level])
    lo = (level0 // d).astype(np.int64)
    hi = np.maximum(((level0 + size0) // d).astype(np.int64), lo + 1)
    hi = np.minimum(hi, lo + GALLERY_MAX)
    array = image.store.level(level)
    if image.dims == 2:
        region = np.asarray(array[:, lo[0] : hi[0], lo[1] : hi[1]])
    else:
        z = int((lo[0] + hi[0]) // 2)
        region = np.asarray(array[:, z, lo[1] : hi[1], lo[2] : hi[2]])
    return image.to_rgb(region)


class _Handler(BaseHTTPRequestHandler):
    app: ViewerApp
    quiet = True
    server_version = "ips-view"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        self._answer(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(send_body=False)

    def _refuse(self) -> None:
        self.send_error(HTTPStatus.METHOD_NOT_ALLOWED, "read-only viewer")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

    def _answer(self, send_body: bool) -> None:
        r = self.app.get(self.path)
        self.send_response(r.status)
        self.send_header("Content-Type", r.content_type)
        self.send_header("Content-Length", str(len(r.body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header(
            "Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self'"
        )
        self.send_header("Cache-Control", "private, max-age=3600" if "/tiles/" in self.path else "no-cache")
        self.end_headers()
        if send_body:
            self.wfile.write(r.body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if not self.quiet:
            super().log_message(format, *args)


def make_server(
    app: ViewerApp, host: str = "127.0.0.1", port: int = 0, quiet: bool = True
) -> ThreadingHTTPServer:
    """A threading HTTP server for `app` bound to (host, port) (port 0: any free one); not yet serving."""
    handler = type("Handler", (_Handler,), {"app": app, "quiet": quiet})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def url_of(server: ThreadingHTTPServer) -> str:
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
