"""Object storage and Dask, measured side by side on this machine:

    python benchmarks/remote.py [--n-patches 4096] [--repeats 3] [--json out.json]

1. remote reads: selection throughput (`ips.algo.selection.select` with a tiny encoder, so reading
   shows) from a store on a local S3 server (moto's, a separate process on 127.0.0.1) against the same
   store on local disk, in one run, repeats interleaved, best of `--repeats`; with prefetch (the
   default, 2 chunks ahead) and without (0). Ratio = S3 seconds / local seconds (goal <= 1.2 with
   prefetch). The S3 server is Python on the same cores: a real object store adds network latency
   instead, which the prefetch hides the same way.
2. Dask prep: 8 generated slides by `ips prep` serially and with `--dask local:2` (and `--workers 2`),
   each `--threads 1`; the stores are compared byte for byte (timestamps masked).
3. interruption: `ips prep --out s3://...` killed (SIGKILL) once its first level-0 shard is on the
   server; the store must open as incomplete, and a rerun must complete it.

Results page row: docs/BENCHMARKS.md, "Stores on S3 and Dask prep".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from ips.algo.selection import eval_mode, select
from ips.bench.models import bench_config
from ips.bench.stores import bench_store
from ips.data.store import StoreError, open_store
from ips.data.streaming import stream_chunks
from ips.data.zarr_source import ZarrPatchSource
from ips.format import location
from ips.model.ips_model import build_model

ROOT = Path(__file__).resolve().parents[1]

BUCKET = "ips-bench"
TIMESTAMP = re.compile(rb'"(created|completed)": ?"[^"]*"')


def start_s3() -> tuple[subprocess.Popen, dict[str, str]]:
    """moto's S3 server in its own process on 127.0.0.1 (a free port), a bucket, and the client env."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(env)
    import boto3

    for _ in range(200):
        try:
            boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
            return proc, env
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("moto server did not start")


def upload(store: Path, url: str) -> None:
    """Copy a local store's files to `url`, the marker last."""
    dest = location.object_store(url, read_only=False)
    files = sorted(p for p in store.rglob("*") if p.is_file())
    for p in sorted(files, key=lambda p: p.name == "ips_complete.json"):
        location.put_bytes(dest, p.relative_to(store).as_posix(), p.read_bytes())


def remote_reads(n_patches: int, patch: int, repeats: int, work: Path, threads: int) -> dict:
    """Selection seconds from local disk and from S3, with and without prefetch (best of repeats)."""
    local = bench_store(work, n_patches, patch_size=patch, tissue_patches=None)
    url = f"s3://{BUCKET}/reads/{local.name}"
    upload(local, url)
    cfg = bench_config(encoder="ips_cnn_tiny", patch_size=patch, memory_size=32, iter_size=256, batch_size=1)
    torch.manual_seed(0)
    model = build_model(cfg.model)

    def selection(store: str | Path, prefetch: int) -> float:
        src = ZarrPatchSource(store, read_threads=threads)  # opened per pass, as training does
        t0 = time.perf_counter()
        with eval_mode(model):
            select(
                model, src, memory_size=32, iter_size=256, stream=partial(stream_chunks, prefetch=prefetch)
            )
        return time.perf_counter() - t0

    def loader(store: str | Path, prefetch: int) -> float:
        src = ZarrPatchSource(store, read_threads=threads)
        t0 = time.perf_counter()
        for _ in stream_chunks(src, 256, prefetch=prefetch):
            pass
        return time.perf_counter() - t0

    runs = {(k, w, p): [] for k in ("selection", "loader") for w in ("local", "s3") for p in (2, 0)}
    selection(local, 2), selection(url, 2)  # warm-up
    for _ in range(repeats):
        for (kind, where, prefetch), times in runs.items():
            run = selection if kind == "selection" else loader
            times.append(run(local if where == "local" else url, prefetch))
    best = {f"{k}_{w}_prefetch{p}_seconds": min(t) for (k, w, p), t in runs.items()}
    for k in ("selection", "loader"):
        for p in (2, 0):
            best[f"{k}_ratio_prefetch{p}"] = (
                best[f"{k}_s3_prefetch{p}_seconds"] / best[f"{k}_local_prefetch{p}_seconds"]
            )
    return {"n_patches": n_patches, "patch_size": patch, "read_threads": threads, **best}


def ips(*args: str, env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "ips.cli", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): TIMESTAMP.sub(rb'"\1": "-"', p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def slides(work: Path, n: int, side: int) -> list[str]:
    from data_prep.testing import tissue_image, write_pyramid_tiff

    folder = work / "slides"
    folder.mkdir(exist_ok=True)
    return [
        str(
            write_pyramid_tiff(folder / f"slide{i}.tif", tissue_image(side, side, seed=i), levels=1, tile=256)
        )
        for i in range(n)
    ]


def dask_prep(work: Path, side: int) -> dict:
    """Wall seconds of `ips prep` on 8 slides: serial, --workers 2, --dask local:2; byte equality."""
    inputs = slides(work, 8, side)
    common = ["--patch-size", "64", "--threads", "1"]
    out = {}
    for name, extra in (
        ("serial", []),
        ("workers2", ["--workers", "2"]),
        ("dask_local2", ["--dask", "local:2"]),
    ):
        out[f"{name}_seconds"] = ips("prep", *inputs, "--out", str(work / name), *common, *extra)
    serial = tree(work / "serial")
    out["files"] = len(serial)
    out["dask_byte_equal_to_serial"] = serial == tree(work / "dask_local2")
    out["workers2_byte_equal_to_serial"] = serial == tree(work / "workers2")
    return out


def interruption(work: Path, env: dict[str, str], side: int) -> dict:
    """SIGKILL a prep to S3 once a level-0 shard is written; open it; rerun it."""
    (work / "big").mkdir()
    (src,) = slides(work / "big", 1, side)
    url = f"s3://{BUCKET}/killed"
    cmd = [sys.executable, "-m", "ips.cli", "prep", src, "--out", url, "--patch-size", "16"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stderr=subprocess.DEVNULL)
    store = location.object_store(f"{url}/slide0.zarr")
    while not location.list_sizes(store, "0/c") and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    objects = location.list_sizes(store)
    try:
        open_store(f"{url}/slide0.zarr")
        refused = "opened (not refused)"
    except StoreError as e:
        refused = str(e)
    rerun = ips("prep", src, "--out", url, "--patch-size", "16", env=env)
    return {
        "objects_when_killed": len(objects),
        "marker_when_killed": "ips_complete.json" in objects,
        "open_after_kill": refused,
        "rerun_seconds": rerun,
        "open_after_rerun": f"{open_store(f'{url}/slide0.zarr').grid().n_patches} patches",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-patches", type=int, default=4096)
    p.add_argument("--patch-size", type=int, default=64)
    p.add_argument("--read-threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slide-side", type=int, default=2048, help="pixels per side of the 8 Dask slides")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--skip", nargs="*", default=[], choices=("dask", "interruption"), help="parts not to run")
    args = p.parse_args()
    torch.set_num_threads(args.torch_threads)
    proc, env = start_s3()
    try:
        with tempfile.TemporaryDirectory(prefix="ips-bench-remote-") as tmp:
            work = Path(tmp)
            result = {
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.torch_threads}",
                "reads": remote_reads(args.n_patches, args.patch_size, args.repeats, work, args.read_threads),
                "dask": None if "dask" in args.skip else dask_prep(work, args.slide_side),
                "interruption": None
                if "interruption" in args.skip
                else interruption(work, env, args.slide_side),
            }
    finally:
        proc.kill()
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
