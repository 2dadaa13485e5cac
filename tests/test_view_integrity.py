"""`ips view` with stores that are damaged or crafted, and clients that misbehave: a read never leaves the
stores (links refused), damage answers one line (500, or 404 for a vanished store) without local paths and
without tracebacks, malformed request lines get 400, other Host names 421, idle connections are closed,
many connections are queued (not reset) and served by a bounded number of threads."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr
from inference_fixtures import make_store

from ips.format import names as sf
from ips.view.catalog import build_catalog
from ips.view.server import HostCheck, ViewerApp, make_server, url_of
from ips.view.serving import BACKLOG, Limits

ROOT = Path(__file__).resolve().parents[1]
SIZE = (384, 320)  # one shard at level 0; tiles 0_0 (256 x 256) and 1_0 (128 x 256)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Two stores of the same layout and different pixels: `a` is served, `b` is what a link points at."""
    root = tmp_path_factory.mktemp("integrity")
    return SimpleNamespace(
        a=make_store(root / "a", "s", size=SIZE, patch=32, seed=0),
        b=make_store(root / "b", "s", size=SIZE, patch=32, seed=1),
    )


def copy_store(base_store: Path, where: Path, name: str = "s") -> Path:
    where.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(base_store, where / f"{name}.zarr", symlinks=True))


def drop_from_marker(store: Path, array: str) -> None:
    """What the issue's attacker did: the array is no longer recorded, so no checksum covers it."""
    marker = store / sf.COMPLETE_MARKER
    record = json.loads(marker.read_text())
    del record["arrays"][array]
    marker.write_text(json.dumps(record))


def make_app(*stores: Path, **kw) -> tuple[ViewerApp, list[str]]:
    logged: list[str] = []
    return ViewerApp(build_catalog(list(stores), **kw), log=logged.append), logged


def decode(body: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(body)))


@contextmanager
def serving(app: ViewerApp, **kw):
    server = make_server(app, **kw)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def raw(server, data: bytes, timeout: float = 10) -> bytes:
    """Send `data` on a fresh connection and read the answer to the end."""
    with socket.create_connection(server.server_address[:2], timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_and_body(answer: bytes) -> tuple[int, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


# -- reads stay inside the stores ---------------------------------------------------------------------------


def test_a_chunk_linked_to_a_file_outside_is_refused(base, tmp_path):
    """The issue's attack: a shard replaced by a symlink to a file outside (here another store's shard,
    which decodes: served, it would show that store's pixels) and dropped from the marker."""
    store = copy_store(base.a, tmp_path / "sent")
    shard = store / "0" / "c" / "0" / "0" / "0"
    shard.unlink()
    shard.symlink_to(base.b / "0" / "c" / "0" / "0" / "0")
    drop_from_marker(store, "0")
    app, logged = make_app(store)
    for path in ("/api/slides/s/tiles/0/0_0.png", "/api/slides/s", "/api/slides/s/mask.png"):
        r = app.get(path)
        assert r.status == 500 and r.content_type.startswith("text/plain"), (path, r.body[:80])
        assert b"symlink" in r.body and str(tmp_path).encode() not in r.body
    assert len(logged) == 1 and "0/c/0/0/0" in logged[0]  # one line per distinct failure


@pytest.mark.parametrize("linked", ["0", "0/zarr.json", "mask/c/0/0", "zarr.json"])
def test_any_link_inside_a_store_is_refused(base, tmp_path, linked):
    store = copy_store(base.a, tmp_path / "sent")
    target = store / linked
    outside = tmp_path / "outside"
    shutil.move(target, outside)
    target.symlink_to(outside, target_is_directory=outside.is_dir())
    app, _ = make_app(store)
    r = app.get("/api/slides/s/tiles/0/0_0.jpg")
    assert r.status == 500 and b"symlink" in r.body, r.body


def test_a_fifo_inside_a_store_is_refused_not_waited_on(base, tmp_path):
    store = copy_store(base.a, tmp_path / "sent")
    shard = store / "0" / "c" / "0" / "0" / "0"
    shard.unlink()
    os.mkfifo(shard)
    drop_from_marker(store, "0")
    app, _ = make_app(store)
    r = app.get("/api/slides/s/tiles/0/0_0.jpg")  # an open() of the FIFO would block here forever
    assert r.status == 500 and b"not a regular file" in r.body


def test_the_store_root_may_be_a_link(base, tmp_path):
    """The user's own path to a store may be a link (a store kept on another disk)."""
    link = tmp_path / "s.zarr"
    link.symlink_to(base.a, target_is_directory=True)
    app, logged = make_app(link)
    r = app.get("/api/slides/s/tiles/0/0_0.png")
    assert r.status == 200 and not logged
    from ips.data.store import open_store

    want = np.asarray(open_store(base.a).level(0)[:, :256, :256]).transpose(1, 2, 0)
    np.testing.assert_array_equal(decode(r.body), want)


def write_heatmap(store: Path, heatmaps: Path) -> Path:
    """`heatmaps/<id>/scores.zarr` as `ips heatmap` writes it, with made-up attention."""
    from ips.config import TaskConfig
    from ips.data.store import open_store
    from ips.infer.heatmap import GridGeometry, write_scores

    s = open_store(store)
    coords, info = s.coords(), s.grid()
    n = len(coords)
    logits = np.linspace(-1, 1, n, dtype=np.float32)[:, None, None]
    inf = SimpleNamespace(
        n_patches=n,
        selected=np.arange(2),
        head_logits=logits,
        lse=np.log(np.exp(logits.astype(np.float64)).sum(axis=0)),
        attention=(np.exp(logits) / np.exp(logits).sum()).mean(axis=2).astype(np.float32),
        mean_logit=logits.mean(axis=2),
    )
    geom = GridGeometry(
        "default", info.level, coords, coords, np.asarray(info.patch_size), np.asarray(info.stride)
    )
    out = heatmaps / "s"
    out.mkdir(parents=True)
    task = TaskConfig(name="t", kind="binary", num_classes=2, label_column="label")
    return write_scores(out / "scores.zarr", inf, geom, [task], {"slide_id": "s"})


def test_a_link_in_a_heatmap_is_refused(base, tmp_path):
    heatmaps = tmp_path / "heatmaps"
    scores = write_heatmap(base.a, heatmaps)
    app, _ = make_app(base.a, heatmaps=heatmaps)
    assert app.get("/api/slides/s/overlay/0.png").status == 200
    chunk = next(p for p in (scores / "attention").rglob("*") if p.is_file() and p.name != "zarr.json")
    outside = tmp_path / "outside.bin"
    shutil.move(chunk, outside)
    chunk.symlink_to(outside)
    app, _ = make_app(base.a, heatmaps=heatmaps)
    r = app.get("/api/slides/s/overlay/0.png")
    assert r.status == 500 and b"symlink" in r.body and str(tmp_path).encode() not in r.body


# -- damage: one line, 500, no local path, no traceback ---------------------------------------------------------


def flip_index(store: Path) -> None:
    shard = store / "0" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the shard index, before its crc32c
    shard.write_bytes(bytes(data))


def garble(store: Path) -> None:
    shard = store / "0" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[:16] = bytes(
        b ^ 0x5A for b in data[:16]
    )  # the first chunk's codec header; same size: the stat passes
    shard.write_bytes(bytes(data))


def truncate_unrecorded(store: Path) -> None:
    shard = store / "0" / "c" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-1000])
    drop_from_marker(store, "0")


def huge_chunks(store: Path) -> None:
    """Metadata of a crafted store: chunks of 3 x 8192 x 8192 bytes, each decoded whole by a read."""
    meta_path = store / "0" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [3, 8192, 8192]
    meta["codecs"][0]["configuration"]["chunk_shape"] = [3, 8192, 8192]
    meta_path.write_text(json.dumps(meta))


DAMAGE = {
    "flipped shard index": (flip_index, b"checksum"),
    "garbled chunks": (garble, b"does not decode"),
    "truncated shard": (lambda s: (s / "0" / "c" / "0" / "0" / "0").write_bytes(b"x" * 10), b"bytes"),
    "truncated unrecorded shard": (truncate_unrecorded, b"completion marker"),  # the strict marker names it
    "broken root metadata": (lambda s: (s / "zarr.json").write_text("{"), b"zarr.json"),
    "broken level metadata": (lambda s: (s / "0" / "zarr.json").write_text("{"), b"zarr.json"),
    "deleted level metadata": (lambda s: (s / "0" / "zarr.json").unlink(), b"array '0'"),
    "chunks too large to read": (huge_chunks, b"zarr.json"),  # the marker records the chunk shape
    "broken mask chunk": (lambda s: (s / "mask" / "c" / "0" / "0").write_bytes(b"\0" * 22), b"mask"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_answers_one_line_without_paths_or_tracebacks(base, tmp_path, damage, capfd):
    store = copy_store(base.a, tmp_path / "sent")
    spoil, words = DAMAGE[damage]
    spoil(store)
    app, logged = make_app(store)
    path = "/api/slides/s/mask.png" if "mask" in damage else "/api/slides/s/tiles/0/0_0.jpg"
    with serving(app) as server:
        for _ in range(3):  # the same damage again: answered again, logged once
            status, body = http_get(url_of(server) + path[1:])
            assert status == 500, (damage, body)
            text = body.decode()
            assert text.startswith("500 slide 's' cannot be read: ") and text.count("\n") == 1, text
            assert words in body, text
            assert str(tmp_path) not in text and "/sent/" not in text, text
        assert http_get(url_of(server) + "api/slides")[0] == 200  # the server goes on
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    assert len(logged) == 1 and "\n" not in logged[0] and str(store) in logged[0], (
        logged
    )  # the operator's log


def test_the_command_logs_one_line_per_problem(base, tmp_path):
    """`ips view` itself: a store without checksums (a warning) and a damaged one, each one line on
    stderr (no traceback, no warning's source line), the URL on stdout."""
    legacy = copy_store(base.a, tmp_path / "legacy")
    group = zarr.open_group(str(legacy), mode="r+")  # a genuine format-1 store: attributes and marker agree
    group.attrs["ips"] = {**dict(group.attrs["ips"]), "format_version": 1}
    marker = legacy / sf.COMPLETE_MARKER
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({k: record[k] for k in ("tool_version", "completed", "grids")}))
    damaged = copy_store(base.a, tmp_path / "damaged", "d")
    flip_index(damaged)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ips.cli", "view", str(legacy), str(damaged), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        url = proc.stdout.readline().split(" at ")[1].split()[0]
        assert http_get(url + "api/slides/s/tiles/0/0_0.jpg")[0] == 200
        for _ in range(2):
            assert http_get(url + "api/slides/d/tiles/0/0_0.jpg")[0] == 500
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert "UnverifiedStoreWarning" in lines[0] and str(legacy) in lines[0]
    assert lines[1].startswith(f"ips view: {damaged}: array '0'") and "checksum" in lines[1]


def test_paths_are_scrubbed_in_every_form(base, tmp_path):
    """The store named through a linked folder: neither the given path nor the resolved one is shown."""
    real = tmp_path / "real"
    store = copy_store(base.a, real)
    flip_index(store)
    (tmp_path / "via").symlink_to(real, target_is_directory=True)
    app, _ = make_app(tmp_path / "via" / "s.zarr")
    r = app.get("/api/slides/s/tiles/0/0_0.jpg")
    assert r.status == 500 and b"checksum" in r.body
    assert str(tmp_path).encode() not in r.body and os.path.realpath(tmp_path).encode() not in r.body


def test_a_deleted_store_says_so(base, tmp_path):
    """Deleted after the slide was opened, or before: 404 saying the store is missing; back: served again."""
    store = copy_store(base.a, tmp_path / "sent")
    app, logged = make_app(store)
    assert app.get("/api/slides/s").status == 200
    shutil.move(store, tmp_path / "moved.zarr")
    for path in ("/api/slides/s/mask.png", "/api/slides/s/tiles/0/0_0.jpg", "/api/slides/s"):
        r = app.get(path)
        assert r.status == 404 and b"slide 's': its store is missing" in r.body, (path, r.body)
        assert str(tmp_path).encode() not in r.body
    assert logged and "missing" in logged[0]
    shutil.move(tmp_path / "moved.zarr", store)
    assert app.get("/api/slides/s/mask.png").status == 200


# -- requests --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"GET * HTTP/1.1",
        b"GET noslash HTTP/1.1",
        b"GET noslash",
        b"garbage",
        b"GET / HTTP/x.y",
        b"GET / HTTP/1.1 extra",
        b"GET http://127.0.0.1/ HTTP/1.1",
    ],
)
def test_malformed_request_lines_get_400(base, line, capfd):
    app, logged = make_app(base.a)
    with serving(app) as server:
        answer = raw(server, line + b"\r\nHost: 127.0.0.1\r\n\r\n")
        status, body = status_and_body(answer)
        assert status == 400 and body.startswith(b"400 ") and body.count(b"\n") == 1, answer
        assert raw(server, b"GET /api/slides HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")
    assert not logged and "Traceback" not in capfd.readouterr().err


def test_host_header_is_checked(base):
    app, _ = make_app(base.a)
    with serving(app) as server:
        port = server.server_address[1]
        url = url_of(server) + "api/slides"
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil"):
            status, body = http_get(url, {"Host": host})
            assert status == 421 and b"Host" in body, host
        for host in (
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            "localhost:9000",
            f"[::1]:{port}",
            "127.0.0.1",
        ):
            assert http_get(url, {"Host": host})[0] == 200, host
        assert raw(server, b"GET /api/slides HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")  # no Host
    wide = HostCheck.for_address("0.0.0.0", ["viewer.lab.example"])
    assert wide.allows("10.1.2.3:8765") and wide.allows(f"{socket.gethostname()}:8765")
    assert wide.allows("viewer.lab.example") and not wide.allows("evil.example:8765")
    local = HostCheck.for_address("127.0.0.1")
    assert not local.allows("10.1.2.3") and not local.allows("") and local.allows("[::1]")


# -- connections ------------------------------------------------------------------------------------------------


def test_clients_that_go_away_are_not_errors(base, capfd):
    """Quick navigation: requests whose clients reset or close before the answer; nothing is logged."""
    app, logged = make_app(base.a)
    with serving(app) as server:
        for i in range(60):
            s = socket.create_connection(server.server_address[:2], timeout=5)
            if i % 3:
                s.sendall(
                    f"GET /api/slides/s/tiles/0/{i % 2}_0.png HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
                )
            if i % 2:  # a reset, not a close
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            s.close()
        time.sleep(0.5)
        assert http_get(url_of(server) + "api/slides/s/tiles/0/0_0.png")[0] == 200
    err = capfd.readouterr().err
    assert not logged and "Traceback" not in err and "Error" not in err, err


def test_idle_connections_time_out_and_the_server_stays_responsive(base):
    """300 clients that send half a request and wait: a whole request is still answered at once, and the
    idle ones are closed after the head deadline; past the connection cap the oldest idle one goes."""
    app, _ = make_app(base.a)
    assert app.get("/api/slides/s").status == 200  # opened: the timed request below only reads a tile
    with serving(app, limits=Limits(head_timeout=1.5, max_connections=200, workers=2)) as server:
        idle = []
        for i in range(300):
            s = socket.create_connection(server.server_address[:2], timeout=10)
            s.sendall(b"GET /api/slides/s/ti" if i % 2 else b"")
            idle.append(s)
        t0 = time.monotonic()
        status, _ = http_get(url_of(server) + "api/slides/s/tiles/0/0_0.jpg")
        assert status == 200 and time.monotonic() - t0 < 1.0
        time.sleep(2.5)
        closed = 0
        for s in idle:
            try:
                closed += s.recv(1) == b""
            except ConnectionResetError:
                closed += 1
            s.close()
        assert closed == 300
        assert server.open_connections == 0


def test_backlog_queues_many_connections_and_threads_stay_bounded(base):
    """600 connections made before the server serves: all are queued by the kernel (a backlog of 5 drops
    most), then all answered by the worker pool, with no thread per connection."""
    somaxconn = Path("/proc/sys/net/core/somaxconn")
    if somaxconn.exists() and int(somaxconn.read_text()) < 600:
        pytest.skip(f"net.core.somaxconn is {somaxconn.read_text().strip()}: the kernel caps the backlog")
    assert BACKLOG >= 1024
    app, _ = make_app(base.a)
    server = make_server(app, limits=Limits(workers=4))
    threads_before = threading.active_count()
    conns = []
    try:
        for i in range(600):
            s = socket.create_connection(server.server_address[:2], timeout=5)  # queued: nobody accepts yet
            s.sendall(f"GET /api/slides/s/tiles/0/{i % 2}_0.jpg HTTP/1.0\r\n\r\n".encode())
            conns.append(s)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        answers = []
        for s in conns:
            s.settimeout(60)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            answers.append(data)
            s.close()
        assert all(a.startswith(b"HTTP/1.0 200") for a in answers)
        # the serving thread and 4 workers, whatever the number of connections
        assert threading.active_count() <= threads_before + 1 + 4
    finally:
        server.shutdown()
        server.server_close()
