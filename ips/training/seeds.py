"""Seed variance: one run per seed, and each metric's mean, sd and 95% interval over the seeds.

`ips train --seeds 0,1,2 --out OUT` trains `OUT/seed_0`, `OUT/seed_1`, ... (each a whole run, with the
take-off guard and its restarts, and resumable like any run), then writes `OUT/summary.json` and prints
a table. A seed contributes the metrics of its best epoch (the row `checkpoints/best.pt` holds), its
best epoch, its restarts and the training minutes of all its attempts.

The interval is Student's t with n - 1 degrees of freedom: mean +- t(0.975, n - 1) * sd / sqrt(n), sd
with n - 1 in the denominator. With one seed there is no sd and no interval.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ips.config import ExperimentConfig, with_overrides
from ips.errors import ConfigError
from ips.runtime import DistInfo
from ips.training.restarts import GuardedRun, best_row, train_with_restarts

CONFIDENCE = 0.95
SUMMARY = "summary.json"
# bookkeeping columns of a metrics row, not results
NOT_METRICS = ("epoch", "lr", "seconds", "peak_device_gb")


@dataclass(frozen=True)
class Spread:
    """`n` finite values: their mean, sample sd (n - 1) and the Student-t interval [low, high] at
    `CONFIDENCE`; sd and interval are None below two values, everything is None at none."""

    n: int
    mean: float | None
    sd: float | None
    low: float | None
    high: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.mean is None else self.mean - self.low


def spread(values: Sequence[float], confidence: float = CONFIDENCE) -> Spread:
    """Mean, sd and t interval of `values`, NaN left out (a metric a seed could not compute)."""
    from scipy.stats import t as student_t

    finite = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(finite)
    if n == 0:
        return Spread(0, None, None, None, None)
    mean = sum(finite) / n
    if n == 1:
        return Spread(1, mean, None, None, None)
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return Spread(n, mean, sd, mean - half, mean + half)


def parse_seeds(text: str) -> list[int]:
    """`"0,1,2"` -> [0, 1, 2]; ConfigError for anything else (empty, not integers, repeated)."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"--seeds: expected integers separated by commas, e.g. 0,1,2; got {text!r}"
        ) from None
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: each seed once, got {text!r}")
    if any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds: seeds must be >= 0, got {text!r}")
    return seeds


def seed_metrics(run: GuardedRun) -> dict[str, float]:
    """The numbers one seed contributes: its best epoch's metrics (by the run's monitor; the last epoch
    where none has a value), `best_epoch`, `restarts` and `train_minutes` (all attempts)."""
    row = best_row(run.history, run.monitor) or (run.history[-1] if run.history else {})
    out = {
        k: float(v)
        for k, v in row.items()
        if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    if "epoch" in row:
        out["best_epoch"] = float(row["epoch"])
    out["restarts"] = float(max(0, len(run.attempts) - 1))
    out["train_minutes"] = run.seconds / 60.0
    return out


def summarize(per_seed: Mapping[int, Mapping[str, float]], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Per metric over the seeds: n, mean, sd, the interval (None with one seed) and the values by seed."""
    names: list[str] = []
    for metrics in per_seed.values():
        names += [k for k in metrics if k not in names]
    out: dict[str, Any] = {}
    for name in sorted(names, key=_order):
        values = [per_seed[s].get(name, math.nan) for s in per_seed]
        s = spread(values, confidence)
        out[name] = {
            "n": s.n,
            "mean": s.mean,
            "sd": s.sd,
            "interval": None if s.low is None else [s.low, s.high],
            "half_width": s.half_width,
            "values": {str(seed): _finite(v) for seed, v in zip(per_seed, values)},
        }
        if s.n == 1:
            out[name]["note"] = "n=1: no interval"
    return out


def _order(name: str) -> tuple[int, str]:
    """Validation first, then training, then the rest."""
    return (0 if name.startswith("val_") else 1 if name.startswith("train_") else 2, name)


def _finite(v: float) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


def format_table(metrics: Mapping[str, Mapping[str, Any]], confidence: float = CONFIDENCE) -> str:
    """The summary as a text table: metric, mean +- sd, the interval, n."""
    head = ("metric", "mean +- sd", f"{confidence:.0%} interval (t)", "n")
    lines = [head]
    for name, m in metrics.items():
        if m["mean"] is None:
            mean, interval = "-", "no values"
        elif m["sd"] is None:
            mean, interval = f"{m['mean']:.4f}", "none (n=1)"
        else:
            mean = f"{m['mean']:.4f} +- {m['sd']:.4f}"
            interval = f"[{m['interval'][0]:.4f}, {m['interval'][1]:.4f}]"
        lines.append((name, mean, interval, str(m["n"])))
    widths = [max(len(row[i]) for row in lines) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines)


def run_seeds(
    cfg: ExperimentConfig,
    seeds: Sequence[int],
    *,
    manifest: str | Path,
    out: str | Path,
    dist_info: DistInfo | None = None,
    resume: bool = True,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train `cfg` once per seed into `out/seed_<s>/`; write `out/summary.json` (rank 0) and return it."""
    dist_info = dist_info or DistInfo()
    out = Path(out)
    runs: dict[int, GuardedRun] = {}
    for seed in seeds:
        log(f"seed {seed}: {out / f'seed_{seed}'}")
        runs[seed] = train_with_restarts(
            with_overrides(cfg, train={"seed": seed}),
            manifest=manifest,
            run_dir=out / f"seed_{seed}",
            dist_info=dist_info,
            resume=resume,
            show_progress=show_progress,
            log=log,
        )
    per_seed = {seed: seed_metrics(run) for seed, run in runs.items()}
    summary = {
        "seeds": list(seeds),
        "monitor": next(iter(runs.values())).monitor,
        "confidence": CONFIDENCE,
        "interval": "Student t, n - 1 degrees of freedom: mean +- t * sd / sqrt(n)",
        "runs": [
            {
                "seed": seed,
                "run_dir": str(run.run_dir),
                "attempts": run.attempts,
                "metrics": {k: _finite(v) for k, v in per_seed[seed].items()},
            }
            for seed, run in runs.items()
        ],
        "metrics": summarize(per_seed),
    }
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
        log(format_table(summary["metrics"]))
        log(f"summary of {len(seeds)} seeds: {out / SUMMARY}")
    return summary
