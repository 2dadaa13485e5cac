"""`ips view`: tiles equal the store's pixels (2D and 3D planes), overlays sit on the grid, bad requests get
404/400 (traversal, unknown ids, out-of-range tiles), the server is read-only and local, and memory stays
flat while a large store is served."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr
from inference_fixtures import make_store

from ips.data.store import open_store
from ips.infer.heatmap import GridGeometry, write_scores
from ips.infer.render import overlay_colors
from ips.infer.scale import Scale, colorize
from ips.synthetic import TRUTH_GROUP
from ips.synthetic.lesions import make_lesion_dataset
from ips.view.catalog import build_catalog, unmatched
from ips.view.server import ViewerApp, make_server, url_of
from ips.view.tiles import TILE_SIZE, ByteLRU

ROOT = Path(__file__).resolve().parents[1]


# -- fixtures: lesion slides whose "heatmap" is the truth (a model that found the lesions) ------------------


def truth_scores(store_path: Path, out_dir: Path, slide_id: str) -> Path:
    """Write `out_dir/<slide_id>/scores.zarr` as `ips heatmap` does, with attention proportional to each
    patch's lesion share (plus a little everywhere): the top patches are the lesion's."""
    from ips.config import TaskConfig

    store = open_store(store_path)
    coords = store.coords()
    info = store.grid()
    truth = np.asarray(
        zarr.open_group(str(store_path), mode="r")[f"{TRUTH_GROUP}/lesion"][...], dtype=np.float64
    )
    head_logits = np.log(truth + 1e-3)[:, None, None].astype(np.float32)  # (N, T=1, H=1)
    lse = np.log(np.exp(head_logits.astype(np.float64)).sum(axis=0))  # (T, H)
    order = np.argsort(-truth, kind="stable")[:4]
    inf = SimpleNamespace(
        n_patches=len(coords),
        selected=order,
        head_logits=head_logits,
        lse=lse,
        attention=np.exp(head_logits - lse[None]).mean(axis=2).astype(np.float32),
        mean_logit=head_logits.mean(axis=2),
    )
    down = store.level_downsample(info.level).astype(np.int64)
    geom = GridGeometry(
        "default",
        info.level,
        coords,
        coords * down,
        np.asarray(info.patch_size) * down,
        np.asarray(info.stride) * down,
    )
    task = TaskConfig(name="lesion", kind="binary", num_classes=2, label_column="label")
    out = out_dir / slide_id
    out.mkdir(parents=True, exist_ok=True)
    write_scores(
        out / "scores.zarr",
        inf,
        geom,
        [task],
        {"slide_id": slide_id, "mode": "topm", "probabilities": {"lesion": [0.9]}},
    )
    return out


def lesion_site(store_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A planted lesion's centre `(d,)` and the level-0 centre of a patch wholly inside a lesion."""
    root = zarr.open_group(str(store_path), mode="r")
    lesions = root[TRUTH_GROUP].attrs["lesions"]
    truth = np.asarray(root[f"{TRUTH_GROUP}/lesion"][...])
    store = open_store(store_path)
    i = int(np.argmax(truth))
    size = np.asarray(store.grid().patch_size)
    return np.asarray(lesions[0]["center"]), store.coords()[i] + size // 2


def write_predictions(path: Path, rows: list[tuple[str, float, int]]) -> Path:
    lines = ["slide_id,task,prob_1,prediction,label"]
    lines += [f"{s},lesion,{p},{int(p > 0.5)},{label}" for s, p, label in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def lesions2d(tmp_path_factory):
    """Two 768-px lesion slides (one positive), truth heatmaps, predictions (the positive one missed)."""
    root = tmp_path_factory.mktemp("view2d")
    manifest = make_lesion_dataset(root / "data", 2, 768, 32, 0)
    heat = root / "heatmaps"
    for sid in ("lesion2d_0000", "lesion2d_0001"):
        truth_scores(root / "data" / "stores" / f"{sid}.zarr", heat, sid)
    preds = write_predictions(
        root / "predictions.csv", [("lesion2d_0000", 0.2, 1), ("lesion2d_0001", 0.1, 0)]
    )
    return SimpleNamespace(
        root=root,
        manifest=manifest,
        heatmaps=heat,
        predictions=preds,
        positive=root / "data" / "stores" / "lesion2d_0000.zarr",
    )


@pytest.fixture(scope="module")
def app2d(lesions2d):
    return ViewerApp(build_catalog([], lesions2d.manifest, lesions2d.heatmaps, lesions2d.predictions))


def decode(body: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(body)))


# -- tiles equal the store's pixels ----------------------------------------------------------------------------


def test_2d_tiles_equal_the_store_at_every_level(app2d, lesions2d):
    store = open_store(lesions2d.positive)
    assert len(store.level_downsamples) == 2  # 768 and 384 px
    for level in (0, 1):
        pixels = np.asarray(store.level(level)[...])  # (3, Y, X)
        n = -(-pixels.shape[1] // TILE_SIZE)
        for ty, tx in {(0, 0), (n - 1, n - 1), (1, 0), (0, n - 1)}:
            r = app2d.get(f"/api/slides/lesion2d_0000/tiles/{level}/{ty}_{tx}.png")
            assert r.status == 200 and r.content_type == "image/png"
            want = pixels[:, ty * TILE_SIZE : (ty + 1) * TILE_SIZE, tx * TILE_SIZE : (tx + 1) * TILE_SIZE]
            np.testing.assert_array_equal(decode(r.body), want.transpose(1, 2, 0))
    jpg = app2d.get("/api/slides/lesion2d_0000/tiles/0/1_1.jpg")
    assert jpg.status == 200 and jpg.content_type == "image/jpeg"
    want = np.asarray(store.level(0)[:, 256:512, 256:512]).transpose(1, 2, 0).astype(np.float64)
    assert np.abs(decode(jpg.body).astype(np.float64) - want).mean() < 4  # lossy, but the same picture


def test_edge_tiles_are_clipped_not_padded(tmp_path):
    store = make_store(tmp_path, "odd", size=(300, 200), patch=16)
    app = ViewerApp(build_catalog([store]))
    tile = decode(app.get("/api/slides/odd/tiles/0/1_0.png").body)
    assert tile.shape == (300 - 256, 200, 3)
    np.testing.assert_array_equal(tile, np.asarray(open_store(store).level(0)[:, 256:, :]).transpose(1, 2, 0))


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    root = tmp_path_factory.mktemp("view3d")
    manifest = make_lesion_dataset(root / "data", 2, 64, 16, 0, spatial_dims=3)
    store = root / "data" / "stores" / "lesion3d_0000.zarr"
    truth_scores(store, root / "heatmaps", "lesion3d_0000")
    return SimpleNamespace(root=root, manifest=manifest, store=store, heatmaps=root / "heatmaps")


def test_3d_plane_tiles_equal_the_store(volume, tmp_path):
    # a 2-level volume with a non-uint8 dtype would need a window; this one is uint8 grey (C = 1)
    app = ViewerApp(build_catalog([volume.store], heatmaps=volume.heatmaps))
    pixels = np.asarray(open_store(volume.store).level(0)[...])  # (1, Z, Y, X)
    for axis, index in (("z", 0), ("z", 31), ("y", 40), ("x", 63)):
        r = app.get(f"/api/slides/lesion3d_0000/tiles/0/{axis}/{index}/0_0.png")
        assert r.status == 200
        key: list = [0, slice(None), slice(None), slice(None)]
        key["zyx".index(axis) + 1] = index
        plane = pixels[tuple(key)]  # (rows, cols): the two other axes in z, y, x order
        got = decode(r.body)
        assert got.shape == (*plane.shape, 3)
        for c in range(3):
            np.testing.assert_array_equal(got[..., c], plane)
    info = json.loads(app.get("/api/slides/lesion3d_0000").body)
    centre, _ = lesion_site(volume.store)
    peak = np.asarray(info["heatmap"]["tasks"][0]["peak0"])
    assert np.linalg.norm(peak - centre) < 16  # the crosshair starts at the lesion


def test_3d_multilevel_planes(tmp_path):
    store = make_store(
        tmp_path, "vol", size=(40, 96, 80), channels=1, patch=8, background=0, pyramid_max_size=32
    )
    app = ViewerApp(build_catalog([store]))
    s = open_store(store)
    assert len(s.level_downsamples) >= 2
    level1 = np.asarray(s.level(1)[...])  # (1, Z1, Y1, X1)
    got = decode(app.get("/api/slides/vol/tiles/1/y/3/0_0.png").body)
    np.testing.assert_array_equal(got[..., 0], level1[0, :, 3, :])
    assert (
        app.get(f"/api/slides/vol/tiles/1/z/{level1.shape[1]}/0_0.png").status == 404
    )  # past the last plane


# -- overlay, patches, index ------------------------------------------------------------------------------------


def test_overlay_is_the_attention_on_the_grid(app2d, lesions2d):
    info = json.loads(app2d.get("/api/slides/lesion2d_0000").body)
    h = info["heatmap"]
    store = open_store(lesions2d.positive)
    coords = store.coords()
    assert h["stride0"] == [32, 32] and h["n_patches"] == len(coords)
    att = np.asarray(
        zarr.open_group(str(lesions2d.heatmaps / "lesion2d_0000" / "scores.zarr"))["attention"][...]
    )[:, 0]
    image = decode(app2d.get("/api/slides/lesion2d_0000/overlay/0.png").body)  # (rows, cols, 4)
    cells = (coords - np.asarray(h["origin0"])) // 32
    # the shared scale: log2(N * attention), per slide by default (full colour at the slide's peak)
    ratio = np.log2(len(att) * att.astype(np.float64))
    expected = colorize(ratio, Scale(top=max(float(ratio.max()), 1.0)))
    np.testing.assert_array_equal(image[cells[:, 0], cells[:, 1]], expected)
    top = int(np.argmax(att))
    assert tuple(image[tuple(cells[top])]) == tuple(np.rint(overlay_colors()[-1] * 255).astype(np.uint8))
    # the global scale and a threshold, asked for by query: full colour at 64x uniform, nothing at or below T
    image = decode(app2d.get("/api/slides/lesion2d_0000/overlay/0.png?scale=global&threshold=1.5").body)
    expected = colorize(ratio, Scale(top=6.0, threshold=1.5))
    np.testing.assert_array_equal(image[cells[:, 0], cells[:, 1]], expected)
    assert (image[cells[:, 0], cells[:, 1]][ratio <= 1.5, 3] == 0).all() and (ratio <= 1.5).any()
    for bad in ("scale=hot", "threshold=x", "threshold=99"):
        assert app2d.get(f"/api/slides/lesion2d_0000/overlay/0.png?{bad}").status == 400
    # the gallery's best patch and the click lookup agree with the scores
    assert h["tasks"][0]["top"][0]["index"] == top
    r, c = coords[top] + 5
    picked = json.loads(app2d.get(f"/api/slides/lesion2d_0000/at/{r}_{c}").body)
    assert picked["index"] == top and picked["level0"] == coords[top].tolist() and picked["selected"]
    assert picked["attention"]["lesion"] == pytest.approx(float(att[top]))
    assert decode(app2d.get(f"/api/slides/lesion2d_0000/patch/{top}.jpg").body).shape == (32, 32, 3)
    assert decode(app2d.get("/api/slides/lesion2d_0000/mask.png").body).shape == (192, 192, 4)


def test_index_lists_predictions_and_labels(app2d):
    rows = {s["id"]: s for s in json.loads(app2d.get("/api/slides").body)}
    assert set(rows) == {"lesion2d_0000", "lesion2d_0001"}
    p = rows["lesion2d_0000"]["predictions"][0]
    assert (
        p["prediction"] == "0" and p["label"] == "1" and p["probabilities"] == {"1": 0.2}
    )  # a false negative
    assert rows["lesion2d_0000"]["heatmap"]
    for page in ("/", "/slide/lesion2d_0000", "/assets/viewer.js", "/assets/index.js", "/assets/viewer.css"):
        assert app2d.get(page).status == 200, page


def test_pages_load_nothing_from_outside():
    from ips.view.server import ASSETS, asset_path

    for name in ASSETS:
        text = asset_path(name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name


# -- bad requests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/../../etc/passwd",
        "/assets/../server.py",
        "/assets/..%2fserver.py",
        "/assets/%2e%2e/%2e%2e/etc/passwd",
        "/api/slides/..%2F..%2Fetc%2Fpasswd",
        "/api/slides/../lesion2d_0000",
        "/slide/..",
        "/assets/catalog.py",
        "/api/slides/lesion2d_0000/..%2f..%2fmanifest.csv",
        "//etc/passwd",
        "/api/slides/%00",
    ],
)
def test_traversal_is_404(app2d, path):
    assert app2d.get(path).status == 404


@pytest.mark.parametrize(
    "path",
    [
        "/api/slides/nope",
        "/api/slides/nope/tiles/0/0_0.png",
        "/slide/nope",
        "/api/slides/lesion2d_0000/nope",
        "/api/slides/lesion2d_0000/tiles/2/0_0.png",  # no level 2
        "/api/slides/lesion2d_0000/tiles/0/3_0.png",  # 768 px: tiles 0..2
        "/api/slides/lesion2d_0000/tiles/0/0_-1.png",
        "/api/slides/lesion2d_0000/tiles/-1/0_0.png",
        "/api/slides/lesion2d_0000/tiles/0/0_0.gif",
        "/api/slides/lesion2d_0000/tiles/0/z/0/0_0.png",  # 2D: no axis
        "/api/slides/lesion2d_0000/overlay/1.png",
        "/api/slides/lesion2d_0000/patch/100000.jpg",
        "/api/slides/lesion2d_0000/tiles/0/0_0_0.png",
        "/nope",
    ],
)
def test_unknown_ids_and_out_of_range_are_404(app2d, path):
    assert app2d.get(path).status == 404


@pytest.mark.parametrize(
    "path",
    [
        "/api/slides/lesion2d_0000/tiles/x/0_0.png",
        "/api/slides/lesion2d_0000/tiles/0/a_0.png",
        "/api/slides/lesion2d_0000/tiles/99999999999999999999/0_0.png",
        "/api/slides/lesion2d_0000/at/1_b",
    ],
)
def test_malformed_numbers_are_400(app2d, path):
    assert app2d.get(path).status == 400


def test_http_server_is_local_and_read_only(app2d):
    server = make_server(app2d)  # default host 127.0.0.1, a free port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = url_of(server)
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "api/slides/lesion2d_0000/tiles/0/0_0.png", timeout=10) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/png"
        for method, path in (
            ("GET", "../../etc/passwd"),
            ("GET", "api/slides/nope"),
            ("POST", "api/slides"),
            ("PUT", "assets/viewer.js"),
            ("DELETE", "slide/lesion2d_0000"),
        ):
            req = urllib.request.Request(url + path, method=method, data=b"x" if method != "GET" else None)
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=10)
            assert e.value.code == (404 if method == "GET" else 405)
            e.value.close()
    finally:
        server.shutdown()
        server.server_close()


def test_cli_bad_usage_is_exit_2(tmp_path, capsys):
    from ips.cli.main import main

    assert main(["view"]) == 2
    assert main(["view", str(tmp_path / "missing.zarr")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_warns_on_a_non_local_host(lesions2d):
    """Start `ips view --host 0.0.0.0 --port 0`: a warning on stderr, the URL on stdout; then stop it."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ips.cli",
            "view",
            str(lesions2d.positive),
            "--host",
            "0.0.0.0",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        line = proc.stdout.readline()
        assert "1 slides" in line and "http://0.0.0.0:" in line
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "warning" in err and "0.0.0.0" in err


def test_byte_lru_keeps_its_cap():
    cache = ByteLRU(1000)
    for i in range(50):
        cache.put(i, bytes(300))
        assert cache.size <= 1000
    assert len(cache) == 3 and cache.get(49) is not None and cache.get(0) is None
    cache.put("big", bytes(5000))
    assert cache.get("big") is None and cache.size <= 1000


# -- memory ------------------------------------------------------------------------------------------------

SERVE_ALL = textwrap.dedent("""
    import sys
    def peak_kib():  # VmHWM: this process's own peak (ru_maxrss carries the parent's peak across exec)
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
    from ips.view.catalog import build_catalog
    from ips.view.server import ViewerApp
    from ips.view.tiles import TILE_SIZE
    app = ViewerApp(build_catalog([sys.argv[1]]), cache_bytes=4 << 20)
    image = app.slide("big").image
    base = peak_kib()
    n = 0
    for level, (rows, cols) in enumerate(image.shapes):
        for ty in range(-(-rows // TILE_SIZE)):
            for tx in range(-(-cols // TILE_SIZE)):
                assert app.get(f"/api/slides/big/tiles/{level}/{ty}_{tx}.jpg").status == 200
                n += 1
    print(n, base, peak_kib(), app.cache.size)
""")


@pytest.mark.slow
@pytest.mark.rss
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the peak RSS")
def test_memory_is_flat_in_the_slide_size(tmp_path):
    """Serve every tile of every level of a 1024^2 and a 3200^2 store (~10x the pixels) in a fresh process
    with a 4 MiB cache: the peak RSS grows by < 15% (a whole level 0 of the large one is 29 MiB)."""
    peaks = {}
    for side in (1024, 3200):
        store = make_store(tmp_path / str(side), "big", size=(side, side), patch=64)
        out = subprocess.run(
            [sys.executable, "-c", SERVE_ALL, str(store)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        n, base, peak, cached = (int(v) for v in out.stdout.split())
        assert cached <= 4 << 20 and n > 16
        peaks[side] = peak
    assert peaks[3200] / peaks[1024] < 1.15, peaks
    print(f"peak RSS (KiB) serving every tile: {peaks}")


def test_demo_prints_a_view_command_that_parses(lesions2d):
    import shlex

    from ips.cli.main import build_parser
    from ips.demo import view_command

    files = {
        "manifest": str(lesions2d.manifest),
        "heatmaps": str(lesions2d.heatmaps),
        "predictions": str(lesions2d.predictions),
    }
    args = build_parser().parse_args(shlex.split(view_command(files))[1:])
    assert args.command == "view" and args.split == "test" and args.manifest == files["manifest"]
    catalog = build_catalog(args.stores, args.manifest, args.heatmaps, args.predictions, "train")
    assert set(catalog) == {"lesion2d_0000", "lesion2d_0001"}  # this tiny set has only a train split
    assert all(e.heatmap is not None and e.predictions for e in catalog.values())


def test_colour_map_low_transparent_high_dark_and_saturated():
    """Inferno's top (near-white) read as background next to pale H&E; full opacity hid the tissue."""
    table = overlay_colors()  # (256, 4) RGBA in [0, 1]
    assert table[0, 3] == 0 and np.all(np.diff(table[:, 3]) >= 0)  # low attention: the tissue shows
    top = table[-1]
    assert 0.5 <= top[3] <= 0.7 and top[:3].mean() < 0.4 and top[:3].max() - top[:3].min() > 0.4


def test_view_code_passes_state_as_objects():
    """No function of ips/view or its command takes more than 8 parameters (self and keyword-only ones with
    defaults aside), and no call passes more than 6 positional values (state travels as one object)."""
    import ast

    files = sorted((ROOT / "ips" / "view").glob("*.py")) + [ROOT / "ips" / "cli" / "view.py"]
    wide = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [p.arg for p in a.posonlyargs + a.args if p.arg not in ("self", "cls")]
                params += [p.arg for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is None]
                if len(params) > 8:
                    wide.append(f"{path.name}:{node.lineno} def {node.name} ({len(params)} parameters)")
            elif isinstance(node, ast.Call) and len(node.args) > 6:
                wide.append(f"{path.name}:{node.lineno} a call with {len(node.args)} positional values")
    assert not wide, wide


def test_heatmaps_and_predictions_of_other_slides_are_named(lesions2d):
    """Only one of the two slides served: the other's heatmap folder and prediction row are named."""
    catalog = build_catalog([lesions2d.positive], None, lesions2d.heatmaps, lesions2d.predictions)
    assert list(catalog) == ["lesion2d_0000"]
    lines = unmatched(catalog, lesions2d.heatmaps, lesions2d.predictions)
    assert lines == [
        f"--heatmaps {lesions2d.heatmaps}: 1 ('lesion2d_0001') match no slide served (folders are named by slide id)",
        f"--predictions {lesions2d.predictions}: rows of 1 ('lesion2d_0001') match no slide served",
    ]
    full = build_catalog([], lesions2d.manifest, lesions2d.heatmaps, lesions2d.predictions)
    assert unmatched(full, lesions2d.heatmaps, lesions2d.predictions) == []


# -- annotations -------------------------------------------------------------------------------------------------


def _square_xy(store_path: Path, half: int = 90) -> list[list[int]]:
    """A closed square ring `[x, y]` (level-0 px) around the lesion's most lesioned patch (in tissue)."""
    _, (r, c) = lesion_site(store_path)
    r, c = (int(min(max(v, half), 768 - half)) for v in (r, c))  # on the 768-px slide
    return [
        [c - half, r - half],
        [c + half, r - half],
        [c + half, r + half],
        [c - half, r + half],
        [c - half, r - half],
    ]


def _put(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method="PUT", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


def _serve(app):
    import threading

    server = make_server(app)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_without_annotations_every_write_is_405(app2d):
    """The contract: no --annotations, no writes, whatever the method, path or headers."""
    import urllib.request

    server = _serve(app2d)
    try:
        url = url_of(server)
        assert json.loads(urllib.request.urlopen(url + "api/session").read()) == {
            "writable": False,
            "token": None,
        }
        for method in ("PUT", "POST", "DELETE", "PATCH", "OPTIONS"):
            req = urllib.request.Request(
                url + "api/slides/lesion2d_0000/annotations", data=b"{}", method=method
            )
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=10)
            e.value.close()
            assert e.value.code == 405, method
        big = urllib.request.Request(
            url + "api/slides/lesion2d_0000/annotations", data=b"x" * (1 << 20), method="PUT"
        )
        with pytest.raises(urllib.error.HTTPError) as e:  # a large body: still 405, not 413
            urllib.request.urlopen(big, timeout=10)
        e.value.close()
        assert e.value.code == 405
    finally:
        server.shutdown()
        server.server_close()


def test_annotations_saved_atomically_as_qupath_geojson_that_guidance_reads(lesions2d, tmp_path):
    from ips.data.annotations import patch_labels
    from ips.view.annotating import AnnotationFolder

    folder = AnnotationFolder.at(tmp_path / "ann")
    app = ViewerApp(build_catalog([], lesions2d.manifest, lesions2d.heatmaps), annotations=folder)
    server = _serve(app)
    try:
        url = url_of(server)
        host = url.split("/")[2]
        token = json.loads(app.get("/api/session").body)["token"]
        assert token and json.loads(app.get("/api/session").body)["writable"]
        target = url + "api/slides/lesion2d_0000/annotations"
        square = _square_xy(lesions2d.positive)
        feature = {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [square]},
            "properties": {
                "objectType": "annotation",
                "classification": {"name": "Tumor", "color": [200, 0, 0]},
            },
        }
        negative = {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[500, 500], [600, 500], [600, 600], [500, 500]]],
            },
            "properties": {"classification": {"name": "Not tumor"}},
        }
        body = json.dumps({"type": "FeatureCollection", "features": [feature, negative]}).encode()
        ok = {"Content-Type": "application/json", "X-IPS-Token": token, "Origin": f"http://{host}"}
        # refused: another origin, another site, no token, a wrong token, not JSON
        for bad in (
            {**ok, "Origin": "http://evil.example"},
            {**ok, "Sec-Fetch-Site": "cross-site"},
            {k: v for k, v in ok.items() if k != "X-IPS-Token"},
            {**ok, "X-IPS-Token": token[:-1] + "x"},
            {**ok, "Content-Type": "text/plain"},
        ):
            assert _put(target, body, bad)[0] == 403, bad
        assert not (tmp_path / "ann" / "lesion2d_0000.geojson").exists()
        # refused with 400: outside the slide, not polygons, an unknown slide (404)
        outside = json.dumps(
            {**feature, "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [900, 0], [900, 9]]]}}
        )
        assert _put(target, outside.encode(), ok)[0] == 400
        assert _put(target, b"{not json", ok)[0] == 400
        assert _put(url + "api/slides/nope/annotations", body, ok)[0] == 404
        assert _put(url + "api/slides/lesion2d_0000/tiles", body, ok)[0] == 405
        status, text = _put(target, body, ok)
        assert status == 200, text
        assert json.loads(text) == {"saved": 2, "file": "lesion2d_0000.geojson"}
        saved = tmp_path / "ann" / "lesion2d_0000.geojson"
        data = json.loads(saved.read_text())
        assert [f["geometry"]["coordinates"] for f in data["features"]] == [
            [square],
            [[[500, 500], [600, 500], [600, 600], [500, 500]]],
        ]
        assert data["features"][0]["properties"] == {
            "objectType": "annotation",
            "classification": {"name": "Tumor", "color": [200, 0, 0]},
        }
        assert [p.name for p in (tmp_path / "ann").iterdir()] == ["lesion2d_0000.geojson"]  # no temporaries
        assert json.loads(app.get("/api/slides/lesion2d_0000/annotations").body) == data
        # guidance reads it: the patches wholly inside the square, not the negative polygon's
        store = open_store(lesions2d.positive)
        labels = patch_labels(saved, store, "default")
        level0 = store.coords() * store.level_downsample(store.grid().level).astype(int)
        (x0, y0), (x1, y1) = square[0], square[2]
        inside = (
            (level0[:, 1] >= x0)
            & (level0[:, 1] + 32 <= x1)
            & (level0[:, 0] >= y0)
            & (level0[:, 0] + 32 <= y1)
        )
        assert inside.any() and set(labels.positives(1.0)) == set(np.flatnonzero(inside))
        assert not (level0[labels.indices][:, 0] >= 480).any()  # the "Not tumor" polygon is not the region
        # an empty collection removes the file
        assert _put(target, b'{"type": "FeatureCollection", "features": []}', ok)[0] == 200
        assert not saved.exists()
    finally:
        server.shutdown()
        server.server_close()


def test_worklist_of_ips_suggest_read_defensively(lesions2d, tmp_path):
    from ips.errors import ConfigError
    from ips.view.catalog import read_worklist

    wl = tmp_path / "suggest"
    (wl / "regions").mkdir(parents=True)
    square = _square_xy(lesions2d.positive, half=16)
    (wl / "regions" / "lesion2d_0000.geojson").write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "geometry": {"type": "Polygon", "coordinates": [square]},
                        "properties": {"classification": {"name": "IPS suggested"}},
                    }
                ],
            }
        )
    )
    (tmp_path / "outside.geojson").write_text("{}")
    (wl / "suggestions.csv").write_text(
        "slide_id,score,rank,uncertainty,regions\n"
        "ghost,0.9,1,0.1,\n"
        "lesion2d_0001,0.5,3,0.2,../outside.geojson\n"
        "lesion2d_0000,0.7,2,0.3,regions/lesion2d_0000.geojson\n"
    )
    items = read_worklist(wl)
    assert [(w.slide_id, w.rank, w.score) for w in items] == [
        ("ghost", 1, 0.9),
        ("lesion2d_0000", 2, 0.7),
        ("lesion2d_0001", 3, 0.5),
    ]
    assert (
        items[1].regions == wl / "regions" / "lesion2d_0000.geojson" and items[2].regions is None
    )  # not outside DIR
    app = ViewerApp(build_catalog([], lesions2d.manifest, lesions2d.heatmaps), worklist=items)
    assert json.loads(app.get("/api/worklist").body) == [
        {"id": "lesion2d_0000", "score": 0.7, "rank": 2, "regions": True},
        {"id": "lesion2d_0001", "score": 0.5, "rank": 3, "regions": False},
    ]
    assert json.loads(app.get("/api/slides/lesion2d_0000").body)["worklist"] == {
        "rank": 2,
        "score": 0.7,
        "regions": True,
    }
    got = json.loads(app.get("/api/slides/lesion2d_0000/suggested").body)
    assert [f["geometry"]["coordinates"] for f in got["features"]] == [[square]]
    assert json.loads(app.get("/api/slides/lesion2d_0001/suggested").body)["features"] == []
    (wl / "suggestions.csv").write_text("slide_id,rank\nx,1\n")
    with pytest.raises(ConfigError, match="missing score"):
        read_worklist(wl)
    with pytest.raises(ConfigError, match="no suggestions.csv"):
        read_worklist(tmp_path)


def test_annotations_of_an_id_that_cannot_name_a_file(tmp_path):
    """A manifest id with a space and quotes: reading gives none (not 500), the download's name is generic,
    a save is refused with 400 naming why."""
    from ips.view.annotating import AnnotationFolder

    store = make_store(tmp_path, "odd", size=(64, 64), patch=16)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f'slide_id,path\n"a b""c",{store}\n')
    app = ViewerApp(build_catalog([], manifest), annotations=AnnotationFolder.at(tmp_path / "ann"))
    sid = "a%20b%22c"
    r = app.get(f"/api/slides/{sid}/annotations")
    assert r.status == 200 and json.loads(r.body) == {"type": "FeatureCollection", "features": []}
    assert app.get(f"/api/slides/{sid}/annotations.geojson").download == "annotations.geojson"
    r = app.put(f"/api/slides/{sid}/annotations", b'{"type": "FeatureCollection", "features": []}')
    assert r.status == 400 and b"cannot name a file" in r.body
