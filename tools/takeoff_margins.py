"""The take-off guard's margins on the tiny task of its test, over seeds.

Runs the configuration of `tests/test_takeoff.py::test_guard_fires_on_shuffled_labels_and_stays_silent_
when_the_task_is_learnt` (the learnable slides and the same slides with shuffled labels) at each seed and
prints, per run, the guard's status, its score (the mean validation AUROC of epochs 4-6) and the
validation AUROC per epoch.

    python tools/takeoff_margins.py --seeds 0,1,2,3,4,5 --out /tmp/margins
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from test_takeoff import _shuffled  # noqa: E402
from train_fixtures import TINY, make_cross_slides, tiny_config  # noqa: E402

from ips.training.restarts import RECORD, train_with_restarts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4,5")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    manifest = make_cross_slides(args.out / "data", n_train=24, n_val=32, marks=3)
    shuffled = _shuffled(manifest, seed=0)
    print("| seed | labels | guard | score (val AUROC, epochs 4-6) | val AUROC by epoch |")
    print("|---|---|---|---|---|")
    for seed in (int(s) for s in args.seeds.split(",")):
        cfg = tiny_config(
            model={**TINY["model"], "encoder_norm": "batch"},
            selection={**TINY["selection"], "explore": 0.25},
            train={
                **TINY["train"],
                "seed": seed,
                "epochs": 8,
                "takeoff_epoch": 6,
                "takeoff_auroc": 0.75,
                "restarts": 0,
            },
        )
        for name, m in (("true", manifest), ("shuffled", shuffled)):
            run = args.out / f"{name}_{seed}"
            result = train_with_restarts(
                cfg, manifest=m, run_dir=run, show_progress=False, log=lambda s: None
            )
            attempt = json.loads((run / RECORD).read_text())["attempts"][0]
            curve = " ".join(f"{r['val_label/auroc']:.2f}" for r in result.history)
            score = attempt["verdict"]["scores"]["label"]
            print(f"| {seed} | {name} | {attempt['status']} | {score:.3f} | {curve} |", flush=True)


if __name__ == "__main__":
    main()
