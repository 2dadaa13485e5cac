"""Load on `ips view`: 500 tile requests at once, as a page of many viewers (or a quick zoom) makes them,
against the real command in its own process. Every request is answered, and 99% within 5 s on 2 cores.

The standard library's server (listen backlog 5, a thread per connection) reset a third of them and kept
others waiting for minutes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from inference_fixtures import make_store

ROOT = Path(__file__).resolve().parents[1]
CONCURRENT = 500
P99_LIMIT_S = 5.0


async def _get(host: str, port: int, path: str, timeout: float) -> tuple[int, float, str]:
    """One request on its own connection: (status or 0, seconds, error name)."""
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
        writer.close()
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
        return status, time.perf_counter() - t0, ""
    except (OSError, asyncio.TimeoutError) as e:
        return 0, time.perf_counter() - t0, type(e).__name__


async def _all_at_once(
    host: str, port: int, paths: list[str], timeout: float
) -> list[tuple[int, float, str]]:
    return await asyncio.gather(*(_get(host, port, p, timeout) for p in paths))


@pytest.mark.slow
@pytest.mark.timing
def test_500_concurrent_tile_requests_all_answered(tmp_path):
    store = make_store(tmp_path, "load", size=(2048, 2048), patch=64)  # levels of 2048, 1024, 512 px
    tiles = [
        f"/api/slides/load/tiles/{level}/{ty}_{tx}.jpg"  # what the page asks for an RGB slide
        for level, n in ((0, 8), (1, 4), (2, 2))
        for ty in range(n)
        for tx in range(n)
    ]
    paths = [tiles[i % len(tiles)] for i in range(CONCURRENT)]  # 84 distinct tiles, then cache hits
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ips.cli", "view", str(store), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, line + proc.stderr.read()
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        t0 = time.perf_counter()
        results = asyncio.run(_all_at_once("127.0.0.1", port, paths, timeout=120))
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    failed = [r for r in results if r[0] != 200]
    latency = sorted(r[1] for r in results)
    p50, p99 = latency[len(latency) // 2], latency[int(0.99 * len(latency)) - 1]
    print(f"{CONCURRENT} concurrent tiles: p50 {p50:.2f} s, p99 {p99:.2f} s, all in {wall:.2f} s")
    assert not failed, f"{len(failed)} of {CONCURRENT} failed: {sorted({r[2] or r[0] for r in failed})}"
    assert p99 < P99_LIMIT_S, f"p99 {p99:.2f} s (p50 {p50:.2f} s)"
    assert "Traceback" not in err, err
