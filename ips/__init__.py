"""ips: memory-bounded Iterative Patch Selection for gigapixel slides and large 3D volumes.

The curated API (imported on first use, so that `import ips` and `ips --help` stay fast):

- `load_config(path, overrides)` -> `ExperimentConfig`          (ips.config)
- `build_model(model_config)` -> `IPSModel`                      (ips.model)
- `open_store(path)` -> `IpsStore`                               (ips.data.store)
- `select(model, source, memory_size=, iter_size=)` -> top-M    (ips.algo.selection)
- `train(cfg, manifest=, run_dir=)` -> `TrainResult`             (ips.training.loop)
- `Predictor(model, Selector(...))`: top-M prediction as trained  (ips.infer.engine)
- `infer_slide(model, source, memory_size=, iter_size=)`         (ips.infer.engine)

The packages follow the data flow: `format` (store names, sharding) -> `data` (stores, patch sources,
manifests) -> `model` -> `algo` (selection) -> `training` / `infer`; `cli` only parses arguments.
"""

from __future__ import annotations

import importlib
from typing import Any

from ips._version import __version__

_API = {
    "load_config": "ips.config",
    "build_model": "ips.model",
    "open_store": "ips.data.store",
    "select": "ips.algo.selection",
    "train": "ips.training.loop",
    "Selector": "ips.infer.engine",
    "Predictor": "ips.infer.engine",
    "infer_slide": "ips.infer.engine",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'ips' has no attribute {name!r}")
