"""`ips bench throughput`: what a selection pass costs on top of the encoder itself.

On the same N patches of one store, in one process, repeats interleaved:

- selection: `ips.infer.engine.Selector` as training runs it: `stream_chunks` (prefetching reads of the
  store) + `model.embed` + scoring + the top-M buffer;
- encoder only: `model.encoder(model.normalize(x))` over chunks of I of the same patches, held in
  memory (on the device) beforehand: the floor, ratio 1.0;
- selection in memory: the same `select` over those in-memory patches (`InMemoryPatchSource`, no
  reads): the compute the selection adds to the encoder (projection, positions, scores, top-M), apart
  from loading, which the prefetch hides only where a core is free for it;
- loader: `stream_chunks` over the store without a model, against a raw zarr read of the same pixels
  (level 0's bounding box of the grid in one call, zarr's own concurrency).

`--codec blosc-lz4 jpeg jpegxl`: one store per codec (the same pixels before coding); each store's
selection, loader and raw read are interleaved with the one encoder-only pass, so the codecs' ratios come
from one run (a lossy codec costs more to decode: the ratio moves where decoding outpaces the prefetch).

Each figure is the fastest of `repeats` (the least disturbed by other processes); medians are kept too,
and the process CPU time of each (all threads: the work done, which sharing the machine disturbs less).
JSON (a contract, docs/ARCHITECTURE.md): `{"device", "selection_seconds", "encoder_only_seconds", "ratio", ...}`.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from ips.algo.selection import eval_mode
from ips.bench.common import describe_device, format_table, timed
from ips.bench.models import bench_config
from ips.bench.stores import bench_store
from ips.data.sources import InMemoryPatchSource, iter_chunks
from ips.data.streaming import stream_chunks
from ips.data.zarr_source import ZarrPatchSource
from ips.infer.engine import Selector
from ips.model.ips_model import IPSModel, build_model
from ips.runtime import Runtime


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
    codecs: Sequence[str] = ("blosc-lz4",),
    codec_level: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure selection vs. encoder-only and loader vs. raw zarr on `n_patches` patches; the
    `throughput` JSON payload.

    `codecs`: one store per codec (as `ips prep --codec`, all at `codec_level`; None: each codec's
    default), the same pixels before coding; their selection, loader and raw reads are interleaved with
    one encoder-only pass, so the ratios of all codecs come from the same run. The contract keys are the
    first codec's; `codecs` in the payload holds every codec's figures."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not codecs or len(set(codecs)) != len(codecs):
        raise ValueError(f"codecs must be distinct and not empty, got {list(codecs)}")
    if threads:
        torch.set_num_threads(threads)
    rt = Runtime.create(device, key="--device")
    dev = rt.device
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
        stores = {
            c: bench_store(
                root, n_patches, patch_size=patch_size, tissue_patches=None, codec=c, codec_level=codec_level
            )
            for c in codecs
        }
        torch.manual_seed(0)
        model = build_model(cfg.model).to(dev)
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        timing = _Timing(model, cfg, Selector.from_config(cfg.selection, rt), read_threads)
        source = ZarrPatchSource(stores[codecs[0]], grid=cfg.data.grid, read_threads=read_threads)
        n = len(source)
        kinds = timing.memory_kinds(source)
        for c, store in stores.items():
            kinds.update({f"{k}@{c}": fn for k, fn in timing.store_kinds(store, patch_size).items()})
        store_bytes = {c: _level0_bytes(store) for c, store in stores.items()}
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
        "codec": codecs[0],
        "codec_level": codec_level,
    }
    payload = _payload(
        _first_codec(times, codecs[0]), _first_codec(cpu, codecs[0]), dev, n, patch_bytes, settings
    )
    payload["codecs"] = [_codec_row(c, times, cpu, n, patch_bytes, store_bytes[c]) for c in codecs]
    return payload


def _level0_bytes(store: Path) -> int:
    """Bytes on disk of the store's level 0 (the pixels the patches are read from)."""
    return sum(f.stat().st_size for f in (store / "0").rglob("*") if f.is_file())


def _first_codec(values: dict[str, list[float]], first: str) -> dict[str, list[float]]:
    """`selection@<first>` -> `selection` (the contract keys), other codecs' kinds kept as they are."""
    return {k.removesuffix(f"@{first}"): v for k, v in values.items()}


class _Timing:
    """What is timed, side by side: the encoder alone on patches in memory and selection from memory
    (`memory_kinds`), and per store selection, the loader alone and one raw zarr read of the same pixels
    (`store_kinds`)."""

    def __init__(self, model: IPSModel, cfg: Any, selector: Selector, read_threads: int) -> None:
        self.model, self.cfg, self.selector = model, cfg, selector
        self.dev, self.amp = selector.runtime.device, selector.runtime.autocast_dtype
        self.iter_size, self.read_threads, self.prefetch = selector.iter_size, read_threads, selector.prefetch

    def memory_kinds(self, source: ZarrPatchSource) -> dict[str, Callable[[], Any]]:
        """Encoder only and selection on `source`'s patches held in memory (on the device)."""
        in_memory = source.read(np.arange(len(source))).to(self.dev)  # (N, C, P, P) uint8
        memory_source = InMemoryPatchSource(in_memory, source.positions())

        def encoder_only() -> None:
            with eval_mode(self.model):
                _encoder_only(self.model, in_memory, self.iter_size, self.amp)

        in_memory_selector = dataclasses.replace(self.selector, stream=iter_chunks)
        return {
            "encoder_only": encoder_only,
            "selection_in_memory": lambda: in_memory_selector(self.model, memory_source),
        }

    def store_kinds(self, store: Path, patch_size: int) -> dict[str, Callable[[], Any]]:
        """Selection from `store`, its loader alone, and one raw zarr read of the grid's bounding box."""
        grid, threads = self.cfg.data.grid, self.read_threads
        source = ZarrPatchSource(store, grid=grid, read_threads=threads)
        coords = source.coords
        box = (
            slice(None),
            *(slice(int(lo), int(hi) + patch_size) for lo, hi in zip(coords.min(axis=0), coords.max(axis=0))),
        )
        return {  # sources opened per pass, as a run without source reuse opens them
            "selection": lambda: self.selector(
                self.model, ZarrPatchSource(store, grid=grid, read_threads=threads)
            ),
            "loader": lambda: _load_only(
                ZarrPatchSource(store, grid=grid, read_threads=threads), self.iter_size, self.prefetch
            ),
            "raw_zarr": lambda: _raw_zarr(store, source.info.level, box),
        }


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
    """The `throughput` JSON payload (the contract's keys first) from the measured times."""
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


def _codec_row(
    codec: str,
    times: dict[str, list[float]],
    cpu: dict[str, list[float]],
    n: int,
    patch_bytes: int,
    store_bytes: int,
) -> dict[str, Any]:
    """One codec's figures (fastest of the repeats), against the one encoder-only pass of the run."""
    best = {k: min(times[f"{k}@{codec}"]) for k in ("selection", "loader", "raw_zarr")}
    med = statistics.median(times[f"selection@{codec}"]) / statistics.median(times["encoder_only"])
    enc, enc_cpu = min(times["encoder_only"]), min(cpu["encoder_only"])
    return {
        "codec": codec,
        "level0_bytes": store_bytes,
        "selection_seconds": round(best["selection"], 6),
        "ratio": round(best["selection"] / enc, 4),
        "ratio_median": round(med, 4),
        "cpu_ratio": round(min(cpu[f"selection@{codec}"]) / enc_cpu, 4),
        "loader_seconds": round(best["loader"], 6),
        "raw_zarr_seconds": round(best["raw_zarr"], 6),
        "loader_ratio": round(best["loader"] / best["raw_zarr"], 4),
        "loader_cpu_fraction": round(min(cpu[f"loader@{codec}"]) / enc_cpu, 4),
        "patches_per_second": {k: round(n / v, 1) for k, v in best.items()},
        "loader_megabytes_per_second": round(n * patch_bytes / best["loader"] / 1e6, 1),
    }


def throughput_table(result: dict[str, Any]) -> str:
    """The payload as text: the encoder-only floor, then selection, loader and raw read per codec."""
    pps = result["patches_per_second"]
    rows = [
        ["encoder only", f"{result['encoder_only_seconds']:.3f}", f"{pps['encoder_only']:,.0f}", "1 (floor)"],
        [
            "selection, patches in memory",
            f"{result['selection_in_memory_seconds']:.3f}",
            f"{pps['selection_in_memory']:,.0f}",
            f"{result['in_memory_ratio']:.3f}",
        ],
    ]
    for c in result["codecs"]:
        name, cps = c["codec"], c["patches_per_second"]
        rows += [
            [
                f"selection pass, {name}",
                f"{c['selection_seconds']:.3f}",
                f"{cps['selection']:,.0f}",
                f"{c['ratio']:.3f} (median {c['ratio_median']:.3f}, CPU time {c['cpu_ratio']:.3f})",
            ],
            [
                f"loader (stream_chunks), {name}",
                f"{c['loader_seconds']:.3f}",
                f"{cps['loader']:,.0f}",
                f"{c['loader_ratio']:.3f} of raw zarr",
            ],
            [f"raw zarr read, {name}", f"{c['raw_zarr_seconds']:.3f}", f"{cps['raw_zarr']:,.0f}", "1"],
        ]
    head = (
        f"{result['n_patches']:,} patches of {result['patch_size']} px, {result['encoder']}, "
        f"M={result['memory_size']}, I={result['iter_size']}, {result['device']}, "
        f"{result['torch_threads']} torch threads"
    )
    share = ", ".join(f"{c['codec']} {100 * c['loader_cpu_fraction']:.0f}%" for c in result["codecs"])
    foot = (
        f"loading costs {share} of the encoder's CPU time; the prefetch thread hides it where a core is free"
    )
    return head + "\n" + format_table(["pass", "seconds", "patches/s", "ratio"], rows) + "\n" + foot
