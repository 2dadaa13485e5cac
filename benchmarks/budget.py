#!/usr/bin/env python
"""The memory-budget planner at the paper's setting, then one real training step under its plan.

    python benchmarks/budget.py --json budget.json                       # B 16, 250k patches, 5 GB (CUDA)
    python benchmarks/budget.py --device cpu --n 2000 --json b.json      # the same path, small, on a CPU

Config: configs/megapixel_mnist.yaml (the paper's ResNet-18 on 50 px patches, M 100, I 100, B 16,
`train.vram_budget_gb: 5`). One slide of N patches (a generated store) stands for each of the B slides:
the planner measures one step's peak at k slides (selection pass included) and picks the micro-batch; then
one step of the full batch of B selections runs with that micro-batch under the process cap the training
loop sets, and its peak is compared with the budget. JSON: plan, peak, budget, `within_budget`.

Results page row: docs/BENCHMARKS.md, "Memory budget at the paper's setting".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "megapixel_mnist.yaml"))
    p.add_argument("--n", type=int, default=250_000, help="patches in the slide (default 250000)")
    p.add_argument("--device", default="auto", help="auto, cuda, cpu (default auto)")
    p.add_argument("--budget-gb", type=float, default=5.0, help="train.vram_budget_gb (default 5)")
    p.add_argument("--batch-size", type=int, default=16, help="train.batch_size B (default 16)")
    p.add_argument("--store-dir", default=None, help="keep the generated store here (default: temporary)")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    args = p.parse_args(argv)

    from ips.algo.batch import stack_selections
    from ips.bench.stores import bench_store
    from ips.config import load_config
    from ips.data.manifest import SlideRecord
    from ips.data.open import make_source
    from ips.infer.engine import Selector
    from ips.model import build_model
    from ips.runtime import DistInfo
    from ips.training.budget import GB
    from ips.training.loop import make_runtime, plan_budget, targets_for
    from ips.training.step import accumulate_gradients

    cfg = load_config(
        args.config,
        [
            f"train.device={args.device}",
            f"train.vram_budget_gb={args.budget_gb}",
            f"train.batch_size={args.batch_size}",
        ],
    )
    rt = make_runtime(cfg.train, DistInfo())
    tmp = tempfile.TemporaryDirectory(prefix="ips-budget-") if args.store_dir is None else None
    root = Path(tmp.name if tmp else args.store_dir)
    t0 = time.perf_counter()
    store = bench_store(root, args.n, patch_size=cfg.model.patch_size, channels=cfg.model.in_chans)
    labels = {t.name: (0 if t.kind != "multilabel" else (0,) * t.num_classes) for t in cfg.model.tasks}
    record = SlideRecord("budget", str(store), labels=labels)
    seconds_store = time.perf_counter() - t0
    torch.manual_seed(0)
    model = build_model(cfg.model).to(rt.device)
    if rt.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    plan = plan_budget(model, make_source(record, cfg), record, cfg, rt)
    seconds_plan = time.perf_counter() - t0
    print(plan.describe())
    peak = None
    if rt.device.type == "cuda":
        total = torch.cuda.get_device_properties(rt.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gb * GB / total), rt.device)
        torch.cuda.reset_peak_memory_stats(rt.device)
    t0 = time.perf_counter()
    sel = Selector.from_config(cfg.selection, rt)(model, make_source(record, cfg))
    batch = stack_selections(
        [sel] * cfg.train.batch_size,
        targets_for([record] * cfg.train.batch_size, cfg.model.tasks),
        cfg.selection.memory_size,
    )
    model.train()
    accumulate_gradients(
        model,
        batch,
        cfg.model.tasks,
        micro_batch_size=plan.micro_batch_size,
        device=rt.device,
        autocast_dtype=rt.autocast_dtype,
    )
    seconds_step = time.perf_counter() - t0
    if rt.device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(rt.device))
        torch.cuda.set_per_process_memory_fraction(1.0, rt.device)
    result = {
        "device": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu",
        "config": args.config,
        "n_patches": args.n,
        "batch_size": cfg.train.batch_size,
        "memory_size": cfg.selection.memory_size,
        "iter_size": cfg.selection.iter_size,
        "encoder": cfg.model.encoder,
        "patch_size": cfg.model.patch_size,
        "budget_bytes": plan.budget_bytes,
        "micro_batch_size": plan.micro_batch_size,
        "planned_peak_bytes": plan.bytes_per_micro_batch,
        "one_slide_bytes": plan.bytes_one_slide,
        "measured": plan.measured,
        "step_peak_device_bytes": peak,
        "within_budget": None if peak is None else peak <= plan.budget_bytes,
        "seconds": {
            "store": round(seconds_store, 2),
            "plan": round(seconds_plan, 2),
            "step": round(seconds_step, 2),
        },
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if tmp:
        tmp.cleanup()
    return 0 if result["within_budget"] in (True, None) else 1


if __name__ == "__main__":
    sys.exit(main())
