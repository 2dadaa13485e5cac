"""`ips prep ... --dask ADDRESS | local:N`: the inputs as Dask tasks, one per slide.

Each task calls `data_prep.convert.prep_file`, the function the serial path and `--workers` call, so a
slide's store is the same whichever runs it (tests/test_prep_dask.py checks byte equality). Dask
(distributed) schedules, retries a task whose worker died, and reports; nothing here schedules.
`ADDRESS` is a running scheduler (`tcp://host:8786`, from `dask scheduler` / `dask worker`, dask-jobqueue
or a Kubernetes operator); `local:N` starts a `LocalCluster` of N worker processes on this machine (one
thread each: a slide's own decode/encode threads do the parallel work). Workers must see the inputs and
`--out` at the same paths: a shared file system or object storage (`--out s3://...`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_prep.convert import PrepResult, prep_file
from data_prep.options import PrepOptions
from ips.errors import ConfigError


def prep_task(source: str, out: str | Path, options: PrepOptions, reader: str | None) -> PrepResult:
    """One slide on a worker (module-level: workers import it by name)."""
    return prep_file(source, out, options=options, reader=reader)


def parse_dask(spec: str) -> tuple[str | None, int]:
    """`"local:N"` -> `(None, N)`; an address -> `(address, 0)`. ConfigError for a bad `local:N`."""
    if spec.startswith("local:") or spec == "local":
        text = spec.partition(":")[2] or str(max(1, os.cpu_count() or 1))
        if not text.isdigit() or int(text) < 1:
            raise ConfigError(f"--dask {spec}: expected local:N with N >= 1 workers, or a scheduler address")
        return None, int(text)
    return spec, 0


def client_for(spec: str) -> tuple[Any, Any]:
    """`(client, cluster or None)` for `--dask spec`; ConfigError if dask is missing or unreachable."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError("--dask needs dask.distributed: pip install 'ips-wsi[dask]'") from None
    address, n = parse_dask(spec)
    if address is None:
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        )
        return Client(cluster), cluster
    try:
        return Client(address, timeout="30s"), None
    except OSError as e:
        raise ConfigError(f"--dask {address}: cannot reach the scheduler ({e})") from None


def run_dask(
    inputs: list[str],
    out: str | Path,
    options: PrepOptions,
    reader: str | None,
    spec: str,
    report: Callable[[PrepResult], None],
) -> None:
    """Convert `inputs` on the cluster `spec`; `report` gets each slide's result as it finishes (a task
    that failed outright, e.g. its worker died more than the allowed times, is a failed result)."""
    from dask.distributed import as_completed

    client, cluster = client_for(spec)
    try:
        futures = {
            client.submit(prep_task, src, out, options, reader, pure=False, key=f"ips-prep-{i}"): src
            for i, src in enumerate(inputs)
        }
        for fut in as_completed(futures):
            src = futures[fut]
            try:
                result = fut.result()
            except Exception as e:  # noqa: BLE001 - reported per slide, like the serial path
                text = (str(e).strip().splitlines() or [""])[0]
                result = PrepResult(src, Path(src).name, "failed", reason=f"dask task failed: {text}")
            report(result)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
