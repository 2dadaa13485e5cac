"""`ips bench throughput`: what a selection pass costs on top of the encoder itself.

On the same N patches of one store, in one process, repeats interleaved:

- selection: `ips.selection.select` as training runs it: `stream_chunks` (prefetching reads of the
  store) + `model.embed` + scoring + the top-M buffer;
- encoder only: `model.encoder(model.normalize(x))` over chunks of I of the same patches, held in
  memory (on the device) beforehand: the floor, ratio 1.0;
- selection in memory: the same `select` over those in-memory patches (`InMemoryPatchSource`, no
  reads): the compute the selection adds to the encoder (projection, positions, scores, top-M), apart
  from loading, which the prefetch hides only where a core is free for it;
- loader: `stream_chunks` over the store without a model, against a raw zarr read of the same pixels
  (level 0's bounding box of the grid in one call, zarr's own concurrency).

Each figure is the fastest of `repeats` (the least disturbed by other processes); medians are kept too,
and the process CPU time of each (all threads: the work done, which sharing the machine disturbs less).
JSON (DESIGN.md contract): `{"device", "selection_seconds", "encoder_only_seconds", "ratio", ...}`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from ips.algo.selection import eval_mode, select
from ips.bench.common import describe_device, format_table, resolve_device, timed
from ips.bench.models import bench_config
from ips.bench.stores import bench_store
from ips.data.sources import InMemoryPatchSource, iter_chunks
from ips.data.streaming import stream_chunks
from ips.data.zarr_source import ZarrPatchSource
from ips.model.ips_model import IPSModel, build_model


def _encoder_only(
    model: IPSModel, patches: torch.Tensor, iter_size: int, autocast_dtype: torch.dtype | None
) -> None:
    """The encoder on `patches` `(N, C, H, W)` (already on the device) in chunks of `iter_size`."""
    device = patches.device
    with (
        torch.no_grad(),
        torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None),
    ):
        for start in range(0, patches.shape[0], iter_size):
            model.encoder(model.normalize(patches[start : start + iter_size]))


def _load_only(source: ZarrPatchSource, iter_size: int, prefetch: int) -> int:
    n = 0
    for chunk in stream_chunks(source, iter_size, prefetch=prefetch):
        n += chunk.patches.shape[0]
    return n


def _raw_zarr(store: Path, level: int, box: tuple[slice, ...]) -> int:
    """One zarr read of `box` `(c, y, x)` slices of level `level`: bytes read."""
    return int(np.asarray(zarr.open_array(str(store / str(level)), mode="r")[box]).nbytes)


def run_throughput(
    n_patches: int = 2048,
    *,
    encoder: str = "ips_resnet10",
    patch_size: int = 64,
    memory_size: int = 32,
    iter_size: int = 256,
    device: str = "auto",
    threads: int = 0,
    read_threads: int = 2,
    prefetch: int = 2,
    repeats: int = 5,
    store_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure selection vs. encoder-only and loader vs. raw zarr on `n_patches` patches; the
    `throughput` JSON payload."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    amp = torch.bfloat16 if dev.type == "cuda" else None
    cfg = bench_config(
        encoder=encoder,
        patch_size=patch_size,
        memory_size=memory_size,
        iter_size=iter_size,
        batch_size=1,
        device=str(dev),
        read_threads=read_threads,
        prefetch=prefetch,
    )
    tmp = tempfile.TemporaryDirectory(prefix="ips-bench-") if store_dir is None else None
    root = Path(tmp.name if tmp else store_dir)  # type: ignore[arg-type]
    try:
        store = bench_store(root, n_patches, patch_size=patch_size, tissue_patches=None)
        torch.manual_seed(0)
        model = build_model(cfg.model).to(dev)
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        source = ZarrPatchSource(store, grid=cfg.data.grid, read_threads=read_threads)
        n = len(source)
        kinds = _kinds(
            model, store, source, cfg, dev, amp, patch_size, memory_size, iter_size, read_threads, prefetch
        )
        times, cpu = _interleaved(kinds, dev, repeats, log)
    finally:
        if tmp is not None:
            tmp.cleanup()
    patch_bytes = int(np.prod(source.patch_shape)) * np.dtype(source.dtype).itemsize
    settings = {
        "encoder": encoder,
        "patch_size": patch_size,
        "memory_size": memory_size,
        "iter_size": iter_size,
        "read_threads": read_threads,
        "prefetch": prefetch,
        "repeats": repeats,
    }
    return _payload(times, cpu, dev, n, patch_bytes, settings)


def _kinds(
    model: IPSModel,
    store: Path,
    source: ZarrPatchSource,
    cfg: Any,
    dev: torch.device,
    amp: torch.dtype | None,
    patch_size: int,
    memory_size: int,
    iter_size: int,
    read_threads: int,
    prefetch: int,
) -> dict[str, Callable[[], Any]]:
    """What is timed, side by side: selection from the store, the encoder alone on the same patches in
    memory, selection from memory, the loader alone, and one raw zarr read of the same pixels."""
    n = len(source)
    in_memory = source.read(np.arange(n)).to(dev)  # (N, C, P, P) uint8: the encoder-only input
    coords = source.coords
    box = (
        slice(None),
        *(slice(int(lo), int(hi) + patch_size) for lo, hi in zip(coords.min(axis=0), coords.max(axis=0))),
    )
    stream = partial(stream_chunks, prefetch=prefetch, pin_memory=dev.type == "cuda")

    def selection() -> Any:
        src = ZarrPatchSource(store, grid=cfg.data.grid, read_threads=read_threads)  # opened per pass
        with eval_mode(model):
            return select(
                model,
                src,
                memory_size=memory_size,
                iter_size=iter_size,
                device=dev,
                stream=stream,
                autocast_dtype=amp,
            )

    memory_source = InMemoryPatchSource(in_memory, source.positions())

    def selection_in_memory() -> Any:
        with eval_mode(model):
            return select(
                model,
                memory_source,
                memory_size=memory_size,
                iter_size=iter_size,
                device=dev,
                stream=iter_chunks,
                autocast_dtype=amp,
            )

    def encoder_only() -> None:
        with eval_mode(model):
            _encoder_only(model, in_memory, iter_size, amp)

    kinds: dict[str, Callable[[], Any]] = {
        "selection": selection,
        "encoder_only": encoder_only,
        "selection_in_memory": selection_in_memory,
        "loader": lambda: _load_only(
            ZarrPatchSource(store, grid=cfg.data.grid, read_threads=read_threads), iter_size, prefetch
        ),
        "raw_zarr": lambda: _raw_zarr(store, source.info.level, box),
    }
    return kinds


def _interleaved(
    kinds: dict[str, Callable[[], Any]], dev: torch.device, repeats: int, log: Callable[[str], None]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds of each kind, `repeats` rounds interleaved (after one warm-up round:
    page cache, allocator, kernels), so that the machine's load falls on every kind alike."""
    for fn in kinds.values():
        timed(fn, dev)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(repeats):
        for kind, fn in kinds.items():
            c0 = time.process_time()
            times[kind].append(timed(fn, dev)[0])
            cpu[kind].append(time.process_time() - c0)
        log(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()))
    return times, cpu


def _payload(
    times: dict[str, list[float]],
    cpu: dict[str, list[float]],
    dev: torch.device,
    n: int,
    patch_bytes: int,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """The `throughput` JSON payload (DESIGN.md's contract keys first) from the measured times."""
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "device": describe_device(dev),
        "torch_threads": torch.get_num_threads(),
        "n_patches": n,
        **settings,
        "selection_seconds": round(best["selection"], 6),
        "encoder_only_seconds": round(best["encoder_only"], 6),
        "ratio": round(best["selection"] / best["encoder_only"], 4),
        "ratio_median": round(med["selection"] / med["encoder_only"], 4),
        "selection_in_memory_seconds": round(best["selection_in_memory"], 6),
        "in_memory_ratio": round(best["selection_in_memory"] / best["encoder_only"], 4),
        "loader_seconds": round(best["loader"], 6),
        "raw_zarr_seconds": round(best["raw_zarr"], 6),
        "loader_ratio": round(best["loader"] / best["raw_zarr"], 4),
        "patches_per_second": {k: round(n / v, 1) for k, v in best.items()},
        "megabytes_per_second": {
            k: round(n * patch_bytes / v / 1e6, 1) for k, v in best.items() if k in ("loader", "raw_zarr")
        },
        # CPU time of the whole process (all threads): the work done, whatever else runs on the machine
        "cpu_seconds": {k: round(min(v), 4) for k, v in cpu.items()},
        "cpu_ratio": round(min(cpu["selection"]) / min(cpu["encoder_only"]), 4),
        # the CPU work of loading, as a share of the encoder's: what a free core must absorb to hide it
        "loader_cpu_fraction": round(min(cpu["loader"]) / min(cpu["encoder_only"]), 4),
        "all_seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def throughput_table(result: dict[str, Any]) -> str:
    pps = result["patches_per_second"]
    rows = [
        [
            "selection pass",
            f"{result['selection_seconds']:.3f}",
            f"{pps['selection']:,.0f}",
            f"{result['ratio']:.3f} (median {result['ratio_median']:.3f}, CPU time {result['cpu_ratio']:.3f})",
        ],
        ["encoder only", f"{result['encoder_only_seconds']:.3f}", f"{pps['encoder_only']:,.0f}", "1 (floor)"],
        [
            "selection, patches in memory",
            f"{result['selection_in_memory_seconds']:.3f}",
            f"{pps['selection_in_memory']:,.0f}",
            f"{result['in_memory_ratio']:.3f}",
        ],
        [
            "loader (stream_chunks)",
            f"{result['loader_seconds']:.3f}",
            f"{pps['loader']:,.0f}",
            f"{result['loader_ratio']:.3f} of raw zarr",
        ],
        ["raw zarr read", f"{result['raw_zarr_seconds']:.3f}", f"{pps['raw_zarr']:,.0f}", "1"],
    ]
    head = (
        f"{result['n_patches']:,} patches of {result['patch_size']} px, {result['encoder']}, "
        f"M={result['memory_size']}, I={result['iter_size']}, {result['device']}, "
        f"{result['torch_threads']} torch threads"
    )
    foot = (
        f"loading costs {100 * result['loader_cpu_fraction']:.0f}% of the encoder's CPU time; the prefetch "
        "thread hides it where a core is free"
    )
    return head + "\n" + format_table(["pass", "seconds", "patches/s", "ratio"], rows) + "\n" + foot
