"""`ips bench encoders`: size, compute, speed and training memory per patch of the encoders we ship.

Per encoder and number of spatial dims (2D at `patch_2d` pixels, RGB; 3D at `patch_3d` voxels, one
channel as CT/MR volumes have):

- `params`: trainable parameters;
- `macs_per_patch`: multiply-accumulates of one forward pass in eval mode, counted by forward hooks
  on the layers that multiply (`ips.model.macs`: convolutions, linear layers, attention's matrix
  products; norms and activations are not counted); `stem_macs_share`: the share of them in the stem convolution (our CNNs only);
- `infer_cpu_ms_per_patch`: process CPU time of the same forward pass (it does not count the time a
  loaded machine keeps the process waiting);
- `infer_ms_per_patch`, `train_ms_per_patch`: wall time of a forward pass (no grad, eval mode) and of a
  forward + backward pass (train mode) on a batch, divided by the batch (fastest of `repeats`);
- `activation_bytes_per_patch`: bytes autograd saves for backward per patch in training (device
  independent: what each of the M selected patches costs);
- `peak_device_bytes_per_patch` (CUDA only, else null): `max_memory_allocated` growth of forward +
  backward, per patch.

Ratios against `ips_resnet10` of the same dims show what the efficient variants save.

Variants by name: `NAME@prune=R` is our CNN `NAME` with each block's inner channels pruned by R,
`@stem=S` adds the stem's output channels (stage 1's stream) pruned by S
(`ips.model.pruning`, importance of the seeded init: sizes and speed, not accuracy); `NAME@keep=K` is a
token-pruning ViT keeping a share K of its tokens per stage in eval mode (`ips.model.token_vit`). Their
rows add `base` and `macs_vs_base` / `infer_vs_base` / `infer_cpu_vs_base` against `NAME` measured in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ips.bench.common import MiB, describe_device, format_table, synchronize
from ips.config import ConfigError, ModelConfig
from ips.model.encoders import build_encoder, list_encoders
from ips.model.ips_model import build_model
from ips.model.macs import count_macs
from ips.model.pruning import prune_model
from ips.runtime import resolve_device

__all__ = ["count_macs", "encoders_table", "measure_encoder", "run_encoders"]

REFERENCE = "ips_resnet10"
TIMM_2D = ("resnet18",)  # the 2D default of ModelConfig (a timm model), for comparison
VARIANTS = {
    2: ("ips_resnet10@prune=0.7", "ips_vit_tiny", "ips_vit_tiny@keep=0.5"),
    3: ("ips_resnet10@prune=0.7",),
}


def build_variant(name: str, *, spatial_dims: int, patch_size: int, in_chans: int) -> nn.Module:
    """An encoder by name, or a pruned variant `NAME@prune=R[@stem=S]` / `NAME@keep=K` (module docstring)."""
    base, *options = name.split("@")
    amounts: dict[str, float] = {}
    for option in options:
        key, _, value = option.partition("=")
        if key not in ("prune", "stem", "keep") or key in amounts:
            raise ConfigError(f"--encoders: {name!r}: a variant is NAME@prune=R[@stem=S] or NAME@keep=K")
        try:
            amounts[key] = float(value)
        except ValueError:
            raise ConfigError(f"--encoders: {name!r}: {value!r} is not a number") from None
    if "keep" in amounts and len(amounts) > 1:
        raise ConfigError(f"--encoders: {name!r}: a variant is NAME@prune=R[@stem=S] or NAME@keep=K")
    if "prune" in amounts or "stem" in amounts:
        cfg = ModelConfig(
            encoder=base,
            encoder_norm="group",
            in_chans=in_chans,
            spatial_dims=spatial_dims,
            patch_size=patch_size,
        )
        ratio, stem = amounts.get("prune", 0.0), amounts.get("stem", 0.0)
        model, _ = prune_model(build_model(cfg), cfg, ratio=ratio, stem=stem)
        return model.encoder
    # ours with GroupNorm, as the table was measured: a training step on a batch of one patch works
    norm = "group" if base in list_encoders() else None
    return build_encoder(
        base,
        in_chans=in_chans,
        spatial_dims=spatial_dims,
        patch_size=patch_size,
        norm=norm,
        token_keep=amounts.get("keep", 1.0),
    )


def stem_macs(module: nn.Module, x: torch.Tensor) -> int | None:
    """MACs of the first layer of one of our `ConvEncoder`s (its stem convolution), None for others."""
    net = getattr(module, "net", None)
    if not isinstance(net, nn.Sequential) or not isinstance(net[0], (nn.Conv2d, nn.Conv3d)):
        return None
    return count_macs(net[0], x)


def saved_activation_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in `module(x)` (each storage counted once;
    parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in params:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    del out
    return total


def _best_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, float]:
    """(wall, process CPU) seconds of `fn()`, each the least of `repeats`. CPU time does not count the
    time a loaded machine keeps the process waiting, so it compares variants where wall time cannot."""
    fn()  # warm-up
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return best, best_cpu


def measure_encoder(
    name: str,
    *,
    spatial_dims: int,
    patch_size: int,
    batch: int,
    device: torch.device,
    repeats: int,
    in_chans: int = 3,
) -> dict[str, Any]:
    """One row of the encoder table (see the module docstring)."""
    torch.manual_seed(0)
    enc = build_variant(name, spatial_dims=spatial_dims, patch_size=patch_size, in_chans=in_chans).to(device)
    x = torch.randn(batch, in_chans, *([patch_size] * spatial_dims), device=device)  # (b, C, *S)
    params = sum(p.numel() for p in enc.parameters() if p.requires_grad)
    enc.eval()
    macs = count_macs(enc, x)
    stem = stem_macs(enc, x)

    def infer() -> None:
        with torch.no_grad():
            enc(x)

    infer_s, infer_cpu_s = _best_time(infer, device, repeats)
    enc.train()

    def train_step() -> None:
        enc(x).sum().backward()

    train_s, _ = _best_time(train_step, device, repeats)
    enc.zero_grad(set_to_none=True)
    act = saved_activation_bytes(enc, x)
    peak_dev = None
    if device.type == "cuda":
        enc.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_step()
        torch.cuda.synchronize(device)
        peak_dev = (torch.cuda.max_memory_allocated(device) - base) // batch
        enc.zero_grad(set_to_none=True)
    return {
        "encoder": name,
        "spatial_dims": spatial_dims,
        "patch_size": patch_size,
        "in_chans": in_chans,
        "params": params,
        "macs_per_patch": macs,
        "stem_macs_share": None if stem is None else round(stem / max(macs, 1), 3),
        "out_dim": int(getattr(enc, "out_dim", 0)),
        "infer_ms_per_patch": round(1e3 * infer_s / batch, 3),
        "infer_cpu_ms_per_patch": round(1e3 * infer_cpu_s / batch, 3),
        "train_ms_per_patch": round(1e3 * train_s / batch, 3),
        "activation_bytes_per_patch": act // batch,
        "peak_device_bytes_per_patch": peak_dev,
        "batch": batch,
    }


def default_encoders(spatial_dims: int) -> list[str]:
    """Ours (`ips_*`, all dims), pruned variants (`VARIANTS`) and, in 2D, the timm default for comparison."""
    ours = [n for n in list_encoders() if n.startswith("ips_")]
    return ours + list(VARIANTS[spatial_dims]) + (list(TIMM_2D) if spatial_dims == 2 else [])


def run_encoders(
    *,
    encoders_2d: Sequence[str] | None = None,
    encoders_3d: Sequence[str] | None = None,
    patch_2d: int = 224,
    patch_3d: int = 64,
    batch_2d: int = 8,
    batch_3d: int = 2,
    in_chans_2d: int = 3,
    in_chans_3d: int = 1,
    repeats: int = 3,
    device: str = "auto",
    threads: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every encoder in 2D and 3D; the `encoders` JSON payload."""
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device, key="--device")
    rows = []
    settings = (
        (2, encoders_2d, patch_2d, batch_2d, in_chans_2d),
        (3, encoders_3d, patch_3d, batch_3d, in_chans_3d),
    )
    for dims, names, patch, batch, chans in settings:
        for name in default_encoders(dims) if names is None else names:
            row = measure_encoder(
                name,
                spatial_dims=dims,
                patch_size=patch,
                batch=batch,
                device=dev,
                repeats=repeats,
                in_chans=chans,
            )
            rows.append(row)
            log(
                f"{dims}D {name}: {row['params'] / 1e6:.2f} M params, {row['macs_per_patch'] / 1e9:.3f} GMACs, "
                f"{row['infer_ms_per_patch']:.2f} ms/patch"
            )
    for row in rows:  # a variant against its base measured in the same run
        base = row["encoder"].partition("@")[0]
        ref = next(
            (r for r in rows if r["encoder"] == base and r["spatial_dims"] == row["spatial_dims"]), None
        )
        if base != row["encoder"] and ref is not None:
            row["base"] = base
            row["macs_vs_base"] = round(row["macs_per_patch"] / max(ref["macs_per_patch"], 1), 3)
            row["infer_vs_base"] = round(row["infer_ms_per_patch"] / max(ref["infer_ms_per_patch"], 1e-9), 3)
            row["infer_cpu_vs_base"] = round(
                row["infer_cpu_ms_per_patch"] / max(ref["infer_cpu_ms_per_patch"], 1e-9), 3
            )
    for row in rows:  # savings against the reference of the same dims
        ref = next(
            (r for r in rows if r["encoder"] == REFERENCE and r["spatial_dims"] == row["spatial_dims"]), None
        )
        if ref is not None:
            row["params_vs_resnet10"] = round(row["params"] / ref["params"], 3)
            row["macs_vs_resnet10"] = round(row["macs_per_patch"] / max(ref["macs_per_patch"], 1), 3)
            row["activation_vs_resnet10"] = round(
                row["activation_bytes_per_patch"] / max(ref["activation_bytes_per_patch"], 1), 3
            )
    return {"device": describe_device(dev), "torch_threads": torch.get_num_threads(), "rows": rows}


def encoders_table(result: dict[str, Any]) -> str:
    body = []
    for r in result["rows"]:
        body.append(
            [
                f"{r['spatial_dims']}D",
                r["encoder"],
                f"{r['in_chans']}x{r['patch_size']}^{r['spatial_dims']}",
                f"{r['params'] / 1e6:.3f}",
                f"{r['macs_per_patch'] / 1e9:.3f}",
                "-" if r["stem_macs_share"] is None else f"{100 * r['stem_macs_share']:.0f}%",
                f"{r['infer_ms_per_patch']:.2f}",
                f"{r['infer_cpu_ms_per_patch']:.2f}",
                f"{r['train_ms_per_patch']:.2f}",
                f"{r['activation_bytes_per_patch'] / MiB:.2f}",
                "-"
                if r["peak_device_bytes_per_patch"] is None
                else f"{r['peak_device_bytes_per_patch'] / MiB:.2f}",
                f"{r.get('params_vs_resnet10', '-')} / {r.get('macs_vs_resnet10', '-')}",
                f"{r['macs_vs_base']} / {r['infer_vs_base']} / {r['infer_cpu_vs_base']}"
                if "base" in r
                else "-",
            ]
        )
    header = [
        "dims",
        "encoder",
        "patch",
        "params M",
        "GMACs",
        "stem",
        "infer ms",
        "infer CPU ms",
        "train ms",
        "act MiB",
        "dev MiB",
        "vs resnet10 (params / MACs)",
        "vs base (MACs / infer / infer CPU)",
    ]
    return f"per patch; {result['device']}, {result['torch_threads']} torch threads\n" + format_table(
        header, body
    )
