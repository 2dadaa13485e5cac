"""The memory figure: peak memory against the number of patches, IPS beside the naive baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ips.bench.common import MiB


def plot_memory(result: dict[str, Any], path: str | Path) -> Path:
    """Write a PNG of the `memory` payload: host RSS (and device memory on CUDA) against N, log-x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    naive = result.get("naive")
    measures = [("peak_host_rss_bytes", "peak host RSS (MiB)")]
    if any(r.get("peak_device_bytes") for r in result["rows"]):
        measures.append(("peak_device_bytes", "peak device memory (MiB)"))
    fig, axes = plt.subplots(1, len(measures), figsize=(5.2 * len(measures), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], measures):
        ax.set_xscale("log")
        ok = [r for r in result["rows"] if r.get(key)]
        ax.plot(
            [r["n_patches"] for r in ok],
            [r[key] / MiB for r in ok],
            "o-",
            color="tab:blue",
            label=f"IPS (M={result['memory_size']}, I={result['iter_size']}, B={result['batch_size']})",
        )
        if naive:
            ran = [r for r in naive["rows"] if r.get(key)]
            ax.plot(
                [r["n_patches"] for r in ran],
                [r[key] / MiB for r in ran],
                "s--",
                color="tab:red",
                label="naive: backprop through all N",
            )
            for r in ran:
                if r.get("status") != "ok":
                    ax.plot(r["n_patches"], r[key] / MiB, "x", color="black", markersize=10)
                    ax.annotate(
                        r["status"].split(":")[0],
                        (r["n_patches"], r[key] / MiB),
                        fontsize=7,
                        xytext=(4, -10),
                        textcoords="offset points",
                    )
            if naive.get("measure") == key:
                ax.axhline(naive["budget_bytes"] / MiB, color="grey", lw=0.8, ls=":")
                ax.annotate(
                    "naive budget",
                    (0.01, naive["budget_bytes"] / MiB),
                    xycoords=("axes fraction", "data"),
                    fontsize=7,
                    xytext=(0, 2),
                    textcoords="offset points",
                    color="grey",
                )
        ax.set_xlabel("patches per slide (N)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"one training step, {result['encoder']} on {result['patch_size']} px patches; {result['device']}",
        fontsize=8,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
