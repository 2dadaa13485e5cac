"""`ips view` in a real browser: headless Chromium from the system packages (/usr/bin/chromium) driven by
playwright. Loads the index and a slide with a planted lesion, zooms in, toggles the overlay, and checks
the screenshot's pixels at the lesion for the overlay's colour. Skips, saying why, without the browser or
playwright (never `playwright install`: it downloads a browser)."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from test_view import lesion_site, lesions2d  # noqa: F401 - the fixture is used by name

from ips.infer.render import overlay_colors
from ips.view.catalog import build_catalog
from ips.view.server import ViewerApp, make_server, url_of

CHROMIUM = os.environ.get("IPS_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 20_000  # every wait is bounded


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; do not run `playwright install`)")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set IPS_CHROMIUM)")
    return sync_playwright


@pytest.fixture(scope="module")
def served(lesions2d):  # noqa: F811
    app = ViewerApp(build_catalog([], lesions2d.manifest, lesions2d.heatmaps, lesions2d.predictions))
    server = make_server(app)  # 127.0.0.1, a free port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield url_of(server)
    server.shutdown()
    server.server_close()


def _pixel(png: bytes, x: float, y: float) -> np.ndarray:
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)
    return image[int(round(y)), int(round(x))]


def _idle(page) -> None:
    """Wait until the page is ready and no tile or overlay image is loading."""
    page.wait_for_function("document.body.dataset.ready === '1'", timeout=WAIT_MS)
    page.wait_for_function(
        "[...document.querySelectorAll('canvas[data-pending]')].every(c => c.dataset.pending === '0')",
        timeout=WAIT_MS,
    )
    page.wait_for_timeout(100)  # one more frame drawn


def test_browser_index_slide_zoom_and_overlay_at_the_lesion(served, lesions2d):  # noqa: F811
    sync_playwright = _browser_or_skip()
    _, patch_centre = lesion_site(lesions2d.positive)  # (row, col) level 0: a patch wholly in the lesion
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            # bypass_csp: the page forbids eval; the test evaluates its probes as strings
            page = browser.new_page(
                viewport={"width": 700, "height": 560}, device_scale_factor=1, bypass_csp=True
            )
            outside = []
            page.on("request", lambda r: None if r.url.startswith(served) else outside.append(r.url))
            # the index: both slides, sortable, filter to the false negatives
            page.goto(served, timeout=WAIT_MS)
            _idle(page)
            assert page.locator("tr[data-slide]").count() == 2
            page.select_option("#outcome", "FN")
            assert page.locator("tr[data-slide]").count() == 1
            page.click("tr[data-slide='lesion2d_0000'] a")
            page.wait_for_url("**/slide/lesion2d_0000", timeout=WAIT_MS)
            _idle(page)
            assert "P(1) = 0.200" in page.inner_text("#prediction")
            canvas = page.locator("#stage canvas").first
            box = canvas.bounding_box()
            level_before = int(canvas.get_attribute("data-level"))
            # zoom in with the wheel over the lesion: the point under the cursor stays put
            x, y = page.evaluate("p => ipsView.viewers[0].toScreen(p)", [float(v) for v in patch_centre])
            page.mouse.move(box["x"] + x, box["y"] + y)
            for _ in range(6):
                page.mouse.wheel(0, -300)
                page.wait_for_timeout(50)
            _idle(page)
            level_after = int(canvas.get_attribute("data-level"))
            assert level_after < level_before  # finer tiles after zooming in
            x2, y2 = page.evaluate("p => ipsView.viewers[0].toScreen(p)", [float(v) for v in patch_centre])
            # the lesion stayed under the cursor (up to the cursor's rounding to whole pixels, times the zoom)
            assert 20 < x2 < box["width"] - 20 and 20 < y2 < box["height"] - 20
            zoom = page.evaluate("ipsView.viewers[0].zoom")
            assert zoom * 32 * 0.5 > 40  # the 32-px (16 um) patch now spans > 40 screen px
            # the lesion with the overlay, and without it
            shot_on = canvas.screenshot()
            page.uncheck("#overlay")
            _idle(page)
            shot_off = canvas.screenshot()
            page.check("#overlay")
            _idle(page)
            on, off = _pixel(shot_on, x2, y2), _pixel(shot_off, x2, y2)
            top = overlay_colors()[-1]  # the lesion's patch has the highest attention
            alpha = top[3] * int(page.input_value("#opacity")) / 100  # the default leaves tissue visible
            assert alpha < 0.7
            expected = off * (1 - alpha) + top[:3] * 255 * alpha  # source-over
            assert np.abs(on - expected).max() < 12, (on, off, expected)
            assert np.abs(on - off).max() > 40  # the overlay visibly changes the lesion
            # clicking the patch shows its score and level-0 coordinates
            page.mouse.click(box["x"] + x2, box["y"] + y2)
            page.wait_for_function(
                "document.getElementById('picked').textContent.includes('level-0')", timeout=WAIT_MS
            )
            assert "lesion: attention" in page.inner_text("#picked")
            assert outside == []  # offline: nothing but the viewer's own server
        finally:
            browser.close()


@pytest.fixture
def served_writable(lesions2d, tmp_path):  # noqa: F811
    from ips.view.annotating import AnnotationFolder

    folder = AnnotationFolder.at(tmp_path / "annotations")
    app = ViewerApp(
        build_catalog([], lesions2d.manifest, lesions2d.heatmaps, lesions2d.predictions), annotations=folder
    )
    server = make_server(app)
    other = make_server(ViewerApp(build_catalog([lesions2d.positive])))  # another origin (another port)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (server, other)]
    for t in threads:
        t.start()
    yield url_of(server), url_of(other), folder.root
    for s in (server, other):
        s.shutdown()
        s.server_close()


def test_browser_draw_save_reload_train_and_cross_origin_refused(served_writable, lesions2d, tmp_path):  # noqa: F811
    """Draw a polygon with the mouse, save it (s), reload: it is there, in the file as QuPath GeoJSON in
    level-0 pixels; a tiny training run reads it through the manifest's annotation column; a page of
    another origin cannot write, even knowing the token."""
    sync_playwright = _browser_or_skip()
    url, other, folder = served_writable
    _, (r, c) = lesion_site(lesions2d.positive)
    r, c = (float(min(max(v, 100), 668)) for v in (r, c))
    corners = [(r - 90, c - 90), (r - 90, c + 90), (r + 90, c + 90), (r + 90, c - 90)]  # (row, col) level 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(
                viewport={"width": 900, "height": 640}, device_scale_factor=1, bypass_csp=True
            )
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "slide/lesion2d_0000", timeout=WAIT_MS)
            _idle(page)
            canvas = page.locator("#stage canvas").first
            box = canvas.bounding_box()
            page.evaluate(
                "p => ipsView.viewers[0].centerOn(p, 1.5)", [r, c]
            )  # the square mid-screen, 270 px wide
            _idle(page)
            page.keyboard.press("d")  # draw mode
            for pt in corners:
                x, y = page.evaluate("p => ipsView.viewers[0].toScreen(p)", list(pt))
                page.mouse.click(box["x"] + x, box["y"] + y)
                page.wait_for_timeout(30)
            page.keyboard.press("Enter")
            state = page.evaluate(
                "[ipsView.mode, JSON.stringify(ipsView.drawing), ipsView.annotations.length]"
            )
            assert page.evaluate("document.body.dataset.annotations") == "1", (errors, state)
            assert page.evaluate("document.body.dataset.dirty") == "1"
            page.keyboard.press("s")
            page.wait_for_function("document.body.dataset.saved === '1'", timeout=WAIT_MS)
            saved = folder / "lesion2d_0000.geojson"
            data = json.loads(saved.read_text())
            (feature,) = data["features"]
            assert feature["properties"]["classification"]["name"] == "Tumor"
            ring = np.asarray(feature["geometry"]["coordinates"][0])  # (5, 2) [x, y], closed
            assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()
            zoom = page.evaluate(
                "ipsView.viewers[0].zoom * ipsView.viewers[0].scale[0]"
            )  # screen px per level-0 px
            expected = np.asarray([[cc, rr] for rr, cc in corners])
            assert (
                np.abs(ring[:4] - expected).max() <= 1.0 / zoom + 0.01
            )  # a click lands on a whole screen pixel
            # reload: the polygon is read back from the server
            page.reload()
            _idle(page)
            assert page.evaluate("document.body.dataset.annotations") == "1"
            back = np.asarray(page.evaluate("ipsView.annotations[0].rings[0]"))  # (4, 2) (row, col)
            np.testing.assert_allclose(back[:, ::-1], ring[:4])
            # import QuPath GeoJSON (a MultiPolygon of two parts, a point that has no area), save, export
            qupath = {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "geometry": {
                            "type": "MultiPolygon",
                            "coordinates": [
                                [[[10, 10], [60, 10], [60, 60], [10, 10]]],
                                [[[100, 100], [150, 100], [150, 150], [100, 100]]],
                            ],
                        },
                        "properties": {"objectType": "annotation", "classification": {"name": "Not tumor"}},
                    },
                    {
                        "type": "Feature",
                        "geometry": {"type": "Point", "coordinates": [5, 5]},
                        "properties": {},
                    },
                ],
            }
            page.set_input_files(
                "#ann-import",
                files=[
                    {
                        "name": "q.geojson",
                        "mimeType": "application/json",
                        "buffer": json.dumps(qupath).encode(),
                    }
                ],
            )
            page.wait_for_function("document.body.dataset.annotations === '3'", timeout=WAIT_MS)
            page.keyboard.press("s")
            page.wait_for_function("document.body.dataset.saved === '1'", timeout=WAIT_MS)
            data = json.loads(saved.read_text())
            assert [f["properties"]["classification"]["name"] for f in data["features"]] == [
                "Tumor",
                "Not tumor",
                "Not tumor",
            ]
            assert data["features"][2]["geometry"]["coordinates"] == [
                [[100, 100], [150, 100], [150, 150], [100, 100]]
            ]
            export = page.request.get(url + "api/slides/lesion2d_0000/annotations.geojson")
            assert export.headers["content-disposition"] == 'attachment; filename="lesion2d_0000.geojson"'
            assert export.json() == data
            # another origin's page cannot write (the token alone does not do: the browser asks first, refused)
            token = page.evaluate("ipsView.session.token")
            page.goto(other, timeout=WAIT_MS)
            _idle(page)
            outcome = page.evaluate(
                """([target, token]) => fetch(target, {method: "PUT", body: '{"type": "FeatureCollection", "features": []}',
                     headers: {"Content-Type": "application/json", "X-IPS-Token": token}})
                   .then(r => "status " + r.status, e => "refused: " + e.name)""",
                [url + "api/slides/lesion2d_0000/annotations", token],
            )
            assert outcome.startswith("refused") or outcome == "status 403", outcome
            no_preflight = page.evaluate(  # a simple request (no preflight): answered 403, nothing written
                """(target) => fetch(target, {method: "PUT", mode: "no-cors", body: "{}"}).then(r => r.type, e => e.name)""",
                url + "api/slides/lesion2d_0000/annotations",
            )
            assert no_preflight in ("opaque", "TypeError")
            assert json.loads(saved.read_text()) == data  # unchanged
            assert errors == []
        finally:
            browser.close()
    # the saved file trains through annotation guidance (the manifest's annotation column), a tiny run
    from train_fixtures import TINY, tiny_config

    from ips.training.loop import train

    manifest = tmp_path / "manifest.csv"
    stores = lesions2d.root / "data" / "stores"
    for name in ("lesion2d_0000", "lesion2d_0001"):  # the val slides: copies (a store is listed once)
        shutil.copytree(stores / f"{name}.zarr", tmp_path / f"{name}v.zarr")
    manifest.write_text(
        "slide_id,path,label,split,annotation\n"
        f"lesion2d_0000,{stores / 'lesion2d_0000.zarr'},1,train,{saved}\n"
        f"lesion2d_0001,{stores / 'lesion2d_0001.zarr'},0,train,\n"
        f"lesion2d_0000v,{tmp_path / 'lesion2d_0000v.zarr'},1,val,\n"
        f"lesion2d_0001v,{tmp_path / 'lesion2d_0001v.zarr'},0,val,\n"
    )
    cfg = tiny_config(
        model={**TINY["model"], "in_chans": 3, "patch_size": 32},
        train={**TINY["train"], "epochs": 1, "batch_size": 2},
    )
    lines: list[str] = []
    result = train(cfg, manifest=manifest, run_dir=tmp_path / "run", show_progress=False, log=lines.append)
    assert any("1 of 2 training slides are annotated" in line for line in lines), lines
    assert len(result.history) == 1


def test_browser_viewer_features(served, lesions2d):  # noqa: F811
    """Index thumbnails and a filter over every column; keys; the view in the URL; the threshold at the
    slide's peak leaves the slide as without overlay; side-by-side stays in sync; the ruler in micrometres;
    the next slide keeps the colour settings."""
    sync_playwright = _browser_or_skip()
    _, patch_centre = lesion_site(lesions2d.positive)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(
                viewport={"width": 900, "height": 600}, device_scale_factor=1, bypass_csp=True
            )
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(served, timeout=WAIT_MS)
            _idle(page)
            page.wait_for_function(
                "[...document.querySelectorAll('img.thumb')].every(i => i.complete && i.naturalWidth > 0)",
                timeout=WAIT_MS,
            )
            assert page.locator("img.thumb").count() == 2
            for text, rows in (("P(1) = 0.200", 1), ("fn", 1), ("0.100", 1), ("yes", 2), ("lesion2d", 2)):
                page.fill("#filter", text)
                assert page.locator("tr[data-slide]").count() == rows, text
            page.goto(served + "slide/lesion2d_0000", timeout=WAIT_MS)
            _idle(page)
            assert "x \u00b7" in page.inner_text("#readout")  # magnification
            z0 = page.evaluate("ipsView.viewers[0].zoom")
            page.keyboard.press("+")
            assert page.evaluate("ipsView.viewers[0].zoom") == pytest.approx(2 * z0)
            page.keyboard.press("g")  # the global scale
            assert page.input_value("#scale") == "global"
            page.wait_for_function("location.hash.includes('scale=global')", timeout=WAIT_MS)
            page.reload()  # the view comes back from the URL
            _idle(page)
            assert page.evaluate("ipsView.viewers[0].zoom") == pytest.approx(2 * z0, rel=1e-3)
            assert page.input_value("#scale") == "global"
            # the threshold at the slide's own peak: nothing coloured, the slide as without the overlay
            page.select_option("#scale", "slide")
            page.evaluate("p => ipsView.viewers[0].centerOn(p)", [float(v) for v in patch_centre])
            _idle(page)
            canvas = page.locator("#stage canvas").first
            top = page.evaluate("ipsView.info.heatmap.tasks[0].scale.top")
            page.evaluate(
                "t => { const s = document.getElementById('threshold'); s.max = 16; s.value = t;"
                " s.dispatchEvent(new Event('input')); }",
                float(np.ceil(top * 4) / 4),
            )
            _idle(page)
            page.uncheck("#outline")  # the top-M outlines are not the colour scale's
            _idle(page)
            at_peak = np.asarray(_image(canvas.screenshot()), dtype=np.int64)
            page.uncheck("#overlay")
            _idle(page)
            off = np.asarray(_image(canvas.screenshot()), dtype=np.int64)
            page.check("#overlay")
            page.check("#outline")
            assert np.abs(at_peak - off).max() <= 2
            # side by side: the right pane follows the left one's pan and zoom
            page.keyboard.press("b")
            _idle(page)
            assert page.locator("#stage canvas").nth(1).is_visible()
            box = canvas.bounding_box()
            page.mouse.move(box["x"] + 100, box["y"] + 100)
            page.mouse.down()
            page.mouse.move(box["x"] + 160, box["y"] + 140, steps=4)
            page.mouse.up()
            left, right = page.evaluate("ipsView.viewers.map(v => [v.center[0], v.center[1], v.zoom])")
            assert left == pytest.approx(right)
            page.keyboard.press("b")
            assert page.evaluate("ipsView.split") is False
            # the ruler: two clicks 100 level-0 px apart along a row = 50 um at 0.5 um/px
            page.keyboard.press("r")
            for dc in (0, 100):
                x, y = page.evaluate(
                    "p => ipsView.viewers[0].toScreen(p)",
                    [float(patch_centre[0]), float(patch_centre[1] + dc)],
                )
                page.mouse.click(box["x"] + x, box["y"] + y)
            length = page.evaluate("ipsView.ruler.length")
            assert length == 2 and "ruler 50." in page.inner_text("#readout")
            page.keyboard.press("Escape")
            page.keyboard.press("n")  # the next slide, with the colour settings
            page.wait_for_url("**/slide/lesion2d_0001*", timeout=WAIT_MS)
            _idle(page)
            assert page.input_value("#threshold") == "6" and page.input_value("#scale") == "slide"
            assert page.evaluate("ipsView.split") is False
            assert errors == []
        finally:
            browser.close()


def _image(png: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB")


def test_browser_volume_page_has_no_errors(tmp_path):
    """A 3D volume's page (three panes) loads and answers the keys without script errors."""
    from inference_fixtures import make_store

    sync_playwright = _browser_or_skip()
    store = make_store(
        tmp_path, "vol", size=(24, 64, 48), channels=1, patch=8, background=0, pyramid_max_size=32
    )
    server = make_server(ViewerApp(build_catalog([store])))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 900, "height": 600}, bypass_csp=True)
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(url_of(server) + "slide/vol", timeout=WAIT_MS)
                _idle(page)
                assert page.locator(".pane canvas").count() == 3
                z = page.evaluate("ipsView.viewers.map(v => v.zoom)")
                for key in ("+", "b", "d", "g", "Escape"):
                    page.keyboard.press(key)
                assert page.evaluate("ipsView.viewers.map(v => v.zoom)") == pytest.approx([2 * v for v in z])
                assert page.is_hidden("#annotate") and errors == []
            finally:
                browser.close()
    finally:
        server.shutdown()
        server.server_close()
