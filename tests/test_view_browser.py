"""`ips view` in a real browser: headless Chromium from the system packages (/usr/bin/chromium) driven by
playwright. Loads the index and a slide with a planted lesion, zooms in, toggles the overlay, and checks
the screenshot's pixels at the lesion for the overlay's colour. Skips, saying why, without the browser or
playwright (never `playwright install`: it downloads a browser)."""

from __future__ import annotations

import io
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
            canvas = page.locator("#stage canvas")
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
