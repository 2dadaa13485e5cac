"""Helpers shared by the benchmarks: peak memory, devices, timing and the `--json` file."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

MiB = 2**20
GiB = 2**30


def peak_rss_bytes() -> int:
    """This process's peak resident set size: VmHWM on Linux (never goes down), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def current_rss_bytes() -> int | None:
    """Resident set size now (VmRSS), or None where /proc is not available."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def describe_device(device: torch.device) -> str:
    """The device in words for the JSON: `cpu (2 cores, <model>)` or the CUDA device's name."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = ", " + line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu ({cores} cores{model})"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """`(seconds, result)` of `fn()`, waiting for the device before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def write_json(path: str | Path, key: str, payload: dict[str, Any], *, top_level: Sequence[str] = ()) -> Path:
    """Write `{key: payload}` to `path`; other top-level keys of an existing file are kept, so one file
    can collect `memory`, `throughput` and `encoders` from separate runs. `top_level`: keys of `payload`
    also written at the top of the file (a contract that names them there). Atomic (temp file + rename)."""
    path = Path(path)
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            data = old if isinstance(old, dict) else {}
        except json.JSONDecodeError:
            data = {}
    data[key] = payload
    data.update({k: payload[k] for k in top_level})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain left-aligned text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_int_list(text: str) -> list[int]:
    """`"1000,10k,0.25M"` -> `[1000, 10000, 250000]` (k and M suffixes allowed)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        scale = 1
        if part[-1] in "km":
            scale = 1000 if part[-1] == "k" else 1_000_000
            part = part[:-1]
        value = float(part) * scale
        if value < 1 or not value.is_integer():
            raise ValueError(f"not a positive whole number: {part!r}")
        out.append(int(value))
    if not out:
        raise ValueError("empty list")
    return out
