"""`ips bench memory`: peak memory of one IPS training step against the number of patches N.

For each N, a fresh process (`python -m ips.bench.memory --worker ...`; peak RSS never goes down within
a process) builds the model, runs one training step of a batch of B slides of N patches each (B
selections streamed from a store, then forward/backward/update on the B x M selected patches) and
reports its peak host RSS (VmHWM) and, on CUDA, `torch.cuda.max_memory_allocated`.

Beside it, the naive baseline (`ips.bench.naive`: backpropagate through all N patches) at increasing N
until it exceeds `naive_budget_bytes` or fails; larger N are not run. On the host the naive worker caps
its own address space a little above the budget, so an over-budget run fails fast instead of pushing
the machine into swap; on CUDA it caps the process's share of device memory.

JSON (a contract, docs/ARCHITECTURE.md): `{"device", "rows": [{"n_patches", "peak_device_bytes", "peak_host_rss_bytes",
"seconds", ...}], ...}`; the naive rows are under `"naive"`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ips.bench.common import GiB, MiB, current_rss_bytes, format_table, peak_rss_bytes

RESULT_PREFIX = "IPS_BENCH_RESULT "
# the naive worker's address-space cap: budget * this + what it had mapped before the step
NAIVE_GUARD = 1.25


# --- the worker (a fresh process per measurement) -------------------------------------------------------


def _vm_size_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cap_host_memory(limit_bytes: int) -> None:
    """Cap this process's address space at its current size + `limit_bytes` (allocations beyond fail)."""
    now = _vm_size_bytes()
    if now is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = now + limit_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def _is_out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this process: `args.mode` 'ips' (one training step) or 'naive'."""
    import torch

    from ips.bench.models import bench_config
    from ips.data.zarr_source import ZarrPatchSource
    from ips.model.ips_model import build_model
    from ips.runtime import Runtime

    if args.threads:
        torch.set_num_threads(args.threads)
    rt = Runtime.create(args.device, key="--device")
    device = rt.device
    cfg = bench_config(
        encoder=args.encoder,
        patch_size=args.patch_size,
        memory_size=args.M,
        iter_size=args.I,
        batch_size=args.B,
        device=str(device),
        read_threads=args.read_threads,
    )
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    labels = [i % 2 for i in range(args.B)]
    sources = [
        ZarrPatchSource(args.store, grid=cfg.data.grid, read_threads=cfg.data.read_threads)
        for _ in range(args.B)
    ]
    n = len(sources[0])
    before = {"rss_before_step_bytes": current_rss_bytes()}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        if args.limit_bytes:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.limit_bytes / total), device)
    elif args.limit_bytes:
        _cap_host_memory(args.limit_bytes)
    status = "ok"
    t0 = time.perf_counter()
    try:
        _one_step(args, model, optimizer, sources, labels, cfg, rt)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except (MemoryError, RuntimeError) as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if args.limit_bytes and _is_out_of_memory(e):
            status = f"over budget: out of memory at the cap of {args.limit_bytes / GiB:.2f} GiB"
        else:
            status = f"failed: {type(e).__name__}: {first[:160]}"
    seconds = time.perf_counter() - t0
    return {
        "n_patches": n,
        "peak_device_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        "peak_host_rss_bytes": peak_rss_bytes(),
        "seconds": round(seconds, 3),
        "status": status,
        **before,
    }


def _one_step(
    args: argparse.Namespace,
    model: Any,
    optimizer: Any,
    sources: list[Any],
    labels: list[int],
    cfg: Any,
    rt: Any,
) -> None:
    """The measured step: IPS (select, then train on the B x M selected patches) or naive (backprop
    through every patch, one slide at a time: the most memory-frugal naive way)."""
    from ips.algo.batch import stack_selections
    from ips.bench.naive import naive_step
    from ips.infer.engine import Selector
    from ips.model.tasks import label_tensor
    from ips.training.step import accumulate_gradients

    device, amp, task = rt.device, rt.autocast_dtype, cfg.model.tasks[0]
    model.train()
    optimizer.zero_grad(set_to_none=True)
    if args.mode == "ips":
        selector = Selector.from_config(cfg.selection, rt)
        selections = [selector(model, source) for source in sources]
        batch = stack_selections(
            selections, {task.name: label_tensor(task, labels)}, cfg.selection.memory_size
        )
        accumulate_gradients(
            model, batch, cfg.model.tasks, micro_batch_size=args.B, device=device, autocast_dtype=amp
        )
    else:  # one slide at a time (micro-batch 1): the most memory-frugal way to train naively
        for source, label in zip(sources, labels):
            naive_step(
                model,
                source,
                {task.name: label_tensor(task, [label])},
                cfg.model.tasks,
                device=device,
                chunk_size=args.I,
                autocast_dtype=amp,
            )
    optimizer.step()


def _worker_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ips.bench.memory", description="one memory measurement")
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--mode", choices=("ips", "naive"), required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--encoder", required=True)
    p.add_argument("--patch-size", type=int, required=True)
    p.add_argument("--M", type=int, required=True)
    p.add_argument("--I", type=int, required=True)
    p.add_argument("--B", type=int, required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--read-threads", type=int, default=2)
    p.add_argument("--limit-bytes", type=int, default=0)
    return p


def worker_main(argv: Sequence[str] | None = None) -> int:
    row = run_worker(_worker_parser().parse_args(argv))
    print(RESULT_PREFIX + json.dumps(row), flush=True)
    return 0


# --- the orchestrator ------------------------------------------------------------------------------------


def _run_in_subprocess(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run a worker; its result row, or a row saying why there is none."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # so `-m ips...` works from an uninstalled checkout
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        out = subprocess.run(
            [sys.executable, "-m", "ips.bench.memory", "--worker", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"status": f"failed: no result within {timeout:.0f} s"}
    for line in reversed(out.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
    killed = out.returncode < 0 or out.returncode == 137
    return {"status": f"failed: {'killed (out of memory?)' if killed else tail[:200]}"}


def run_memory(
    ns: Sequence[int],
    *,
    patch_size: int = 16,
    memory_size: int = 32,
    iter_size: int = 256,
    batch_size: int = 2,
    encoder: str = "ips_cnn_tiny",
    device: str = "auto",
    threads: int = 0,
    read_threads: int = 2,
    store_dir: str | Path | None = None,
    naive: bool = True,
    naive_budget_bytes: int = 4 * GiB,
    timeout: float = 1200.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure IPS (and the naive baseline) at each N of `ns`; the `memory` JSON payload."""
    from ips.bench.common import describe_device
    from ips.bench.stores import bench_store
    from ips.runtime import resolve_device

    ns = sorted(set(int(n) for n in ns))
    dev = resolve_device(device, key="--device")
    tmp = None
    if store_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ips-bench-")
        store_dir = tmp.name
    try:
        stores = {}
        for n in ns:
            t0 = time.perf_counter()
            stores[n] = bench_store(store_dir, n, patch_size=patch_size)
            log(f"store N={n}: {stores[n].name} ({time.perf_counter() - t0:.1f} s)")
        common = _worker_args(
            encoder, patch_size, memory_size, iter_size, batch_size, str(dev), threads, read_threads
        )
        rows = []
        for n in ns:
            row = _run_in_subprocess(["--mode", "ips", "--store", str(stores[n]), *common], timeout)
            row = {
                "n_patches": n,
                "peak_device_bytes": None,
                "peak_host_rss_bytes": None,
                "seconds": None,
                **row,
            }
            rows.append(row)
            log(f"ips   N={n}: {_describe_row(row)}")
        naive_rows = _naive_rows(ns, stores, common, dev, naive_budget_bytes, timeout, log) if naive else []
    finally:
        if tmp is not None:
            tmp.cleanup()
    result: dict[str, Any] = {
        "device": describe_device(dev),
        "torch_threads": threads or "default",
        "encoder": encoder,
        "patch_size": patch_size,
        "memory_size": memory_size,
        "iter_size": iter_size,
        "batch_size": batch_size,
        "rows": rows,
    }
    result.update(_ratios(rows))
    if naive:
        result["naive"] = {
            "budget_bytes": int(naive_budget_bytes),
            "rows": naive_rows,
            "measure": "peak_device_bytes" if dev.type == "cuda" else "peak_host_rss_bytes",
        }
    return result


def _worker_args(
    encoder: str,
    patch_size: int,
    memory_size: int,
    iter_size: int,
    batch_size: int,
    device: str,
    threads: int,
    read_threads: int,
) -> list[str]:
    """The measurement settings as the worker's command-line arguments (the same for IPS and naive)."""
    values = {
        "--encoder": encoder,
        "--patch-size": patch_size,
        "--M": memory_size,
        "--I": iter_size,
        "--B": batch_size,
        "--device": device,
        "--threads": threads,
        "--read-threads": read_threads,
    }
    return [str(x) for pair in values.items() for x in pair]


def _naive_rows(
    ns: Sequence[int],
    stores: dict[int, Path],
    common: list[str],
    dev: Any,
    naive_budget_bytes: int,
    timeout: float,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """The naive baseline at increasing N until one run fails or exceeds the budget; larger N not run."""
    naive_rows: list[dict[str, Any]] = []
    stop = None
    for n in ns:
        if stop is not None:
            naive_rows.append(
                {
                    "n_patches": n,
                    "peak_device_bytes": None,
                    "peak_host_rss_bytes": None,
                    "seconds": None,
                    "status": f"not run ({stop})",
                }
            )
            continue
        limit = int(naive_budget_bytes * NAIVE_GUARD)
        row = _run_in_subprocess(
            ["--mode", "naive", "--store", str(stores[n]), "--limit-bytes", str(limit), *common],
            timeout,
        )
        row = {
            "n_patches": n,
            "peak_device_bytes": None,
            "peak_host_rss_bytes": None,
            "seconds": None,
            **row,
        }
        peak = row["peak_device_bytes"] if dev.type == "cuda" else row["peak_host_rss_bytes"]
        if row["status"] == "ok" and peak is not None and peak > naive_budget_bytes:
            row["status"] = "over budget"
        if row["status"] != "ok":
            stop = f"N={n} was {row['status'].split(':')[0]}"
        naive_rows.append(row)
        log(f"naive N={n}: {_describe_row(row)}")
    return naive_rows


def _ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Peak at the largest N over peak at the smallest N (goal 1.0), host and device."""
    ok = [r for r in rows if r.get("status") == "ok"]
    out: dict[str, Any] = {"host_rss_ratio": None, "device_ratio": None}
    if len(ok) >= 2:
        lo, hi = ok[0], ok[-1]
        out["host_rss_ratio"] = round(hi["peak_host_rss_bytes"] / lo["peak_host_rss_bytes"], 4)
        out["host_rss_growth_bytes"] = hi["peak_host_rss_bytes"] - lo["peak_host_rss_bytes"]
        if lo["peak_device_bytes"] and hi["peak_device_bytes"]:
            out["device_ratio"] = round(hi["peak_device_bytes"] / lo["peak_device_bytes"], 4)
    return out


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MiB:,.1f}"


def _describe_row(row: dict[str, Any]) -> str:
    sec = "-" if row.get("seconds") is None else f"{row['seconds']:.1f} s"
    return (
        f"host peak {_mib(row.get('peak_host_rss_bytes'))} MiB, device peak "
        f"{_mib(row.get('peak_device_bytes'))} MiB, {sec}, {row.get('status')}"
    )


def memory_table(result: dict[str, Any]) -> str:
    """The rows of IPS and the naive baseline side by side."""
    naive = {r["n_patches"]: r for r in result.get("naive", {}).get("rows", [])}
    header = ["N", "IPS host MiB", "IPS device MiB", "IPS s", "naive host MiB", "naive device MiB", "naive"]
    body = []
    for r in result["rows"]:
        nv = naive.get(r["n_patches"], {})
        body.append(
            [
                f"{r['n_patches']:,}",
                _mib(r["peak_host_rss_bytes"]),
                _mib(r["peak_device_bytes"]),
                "-" if r["seconds"] is None else f"{r['seconds']:.1f}",
                _mib(nv.get("peak_host_rss_bytes")),
                _mib(nv.get("peak_device_bytes")),
                nv.get("status", "-").split(" (")[0][:48],
            ]
        )
    lines = [format_table(header, body)]
    if result.get("host_rss_ratio") is not None:
        lines.append(
            f"IPS peak host RSS at N={result['rows'][-1]['n_patches']:,} / N={result['rows'][0]['n_patches']:,}:"
            f" {result['host_rss_ratio']:.3f} ({result['host_rss_growth_bytes'] / MiB:+.1f} MiB)"
        )
    if result.get("device_ratio") is not None:
        lines.append(f"IPS peak device memory ratio: {result['device_ratio']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(worker_main())
