"""Run logs of training and pretraining: metrics as JSONL and CSV, plots of the curves, the progress bar."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append one row per epoch to `metrics.jsonl` and rewrite `metrics.csv` (columns can grow)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.jsonl = run_dir / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        if self.jsonl.exists():  # resumed run: keep the history
            self.rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def truncate(self, epochs: int) -> None:
        """Forget rows after `epochs` (a resumed run redoes them)."""
        self.rows = [r for r in self.rows if r["epoch"] <= epochs]
        self._rewrite()

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv()

    def _rewrite(self) -> None:
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self._write_csv()

    def _write_csv(self) -> None:
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        with (self.run_dir / "metrics.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)

    def plot(self) -> Path | None:
        """`curves.png`: losses and per-task accuracy / AUROC over epochs."""
        if not self.rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in self.rows]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for key in ("train_loss", "val_loss"):
            ys = [r.get(key, math.nan) for r in self.rows]
            axes[0].plot(epochs, ys, marker="o", label=key)
        axes[0].set_xlabel("epoch")
        axes[0].set_title("loss")
        axes[0].legend()
        for key in sorted({k for r in self.rows for k in r}):
            if key.startswith("val_") and key.endswith(("/accuracy", "/auroc", "/c_index")):
                axes[1].plot(epochs, [r.get(key, math.nan) for r in self.rows], marker="o", label=key[4:])
        axes[1].set_xlabel("epoch")
        axes[1].set_title("validation")
        axes[1].set_ylim(0, 1.02)
        if axes[1].lines:
            axes[1].legend(fontsize=7)
        fig.tight_layout()
        path = self.run_dir / "curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def write_loss_log(out: Path, losses: list[float], title: str) -> None:
    """Pretraining's log: `loss.csv` (epoch, loss) and `loss.png`, rewritten after each epoch."""
    with (out / "loss.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "loss"])
        w.writerows([(i + 1, v) for i, v in enumerate(losses)])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(1, len(losses) + 1), losses, marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over `total` batches, or None when not `enabled` (quiet runs, ranks other than 0)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False)
