"""`ips prune --checkpoint CKPT (--ratio R [--stem S] | --keep K) --out DIR [--epochs E] [--manifest CSV] [key=value ...]`

A smaller or faster model from a trained checkpoint, as a checkpoint that loads like any other:

- `--ratio R` (our ips_* CNNs): structured channel pruning of every encoder block's inner channels,
  the least important R of them by normalisation-scaled filter norm (`ips.model.pruning`); with
  `--stem S`, also the least important S of the stem's output channels, which are stage 1's residual
  stream (where a large stem dominates the MACs, as a 7^3 stem on volumes does);
- `--keep K` (token-pruning ViTs, `ips_vit_*`): the share of patch tokens kept at each pruning stage
  in selection and inference (`model.token_keep`; the keep-score heads were trained with the model).

Writes `DIR/pruned.pt` (the pruned model, before fine-tuning) and `DIR/prune.json` (parameters and
MACs per patch of the encoder before and after). With `--epochs E` it then fine-tunes the pruned model
for E epochs on the manifest (default the checkpoint's `data.manifest`) into DIR like `ips train`
(`DIR/checkpoints/best.pt`, metrics.csv; a rerun resumes). `key=value` overrides apply to the
fine-tuning (train.*, selection.*, data.*; the model is fixed by the pruning).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ips.cli._common import add_device, add_overrides, add_overwrite, add_quiet
from ips.cli._threads import add_threads, apply_threads
from ips.config import ConfigError

if TYPE_CHECKING:
    from ips.config import ModelConfig
    from ips.model.ips_model import IPSModel


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prune",
        help="prune a trained model (CNN channels or ViT tokens), optionally fine-tune it",
        description="Prune a trained checkpoint into DIR/pruned.pt (CNN encoder channels with --ratio, "
        "ViT tokens with --keep); with --epochs, fine-tune it into DIR like ips train.",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by ips train")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--ratio", type=float, help="share of each CNN block's inner channels to remove, in [0, 1)"
    )
    what.add_argument(
        "--keep", type=float, help="share of ViT patch tokens kept per pruning stage, in (0, 1]"
    )
    p.add_argument(
        "--stem",
        type=float,
        default=0.0,
        help="with --ratio: share of the stem's output channels (stage 1's residual stream) to remove, "
        "in [0, 1) (default 0)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--epochs", type=int, default=0, help="fine-tuning epochs after pruning (default 0: none)")
    p.add_argument("--manifest", help="fine-tuning slides (default the checkpoint's data.manifest)")
    add_device(p, default=None, help="auto, cpu, cuda, ... (default the checkpoint's train.device)")
    add_overwrite(p, "remove a previous pruning and fine-tuning run in --out and start over")
    add_quiet(p, "no progress bar")
    add_threads(p)
    add_overrides(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ips.config import override_loaded
    from ips.model.checkpoint import load_model, save_checkpoint

    apply_threads(args.threads)
    if args.epochs < 0:
        raise ConfigError(f"--epochs: must be >= 0, got {args.epochs}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    model, cfg = load_model(args.checkpoint)
    before = _size(model, cfg.model)
    if args.stem and args.ratio is None:
        raise ConfigError("--stem: applies with --ratio (CNN channel pruning), not --keep")
    pruned, model_cfg = _pruned(model, cfg.model, ratio=args.ratio, keep=args.keep, stem=args.stem)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    after = _size(pruned, model_cfg)
    if args.overwrite:
        _remove_previous(out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "pruned.pt", model=pruned, config=cfg, epoch=0, metrics={})
    report = {
        "checkpoint": str(args.checkpoint),
        "encoder": model_cfg.encoder,
        **({"ratio": args.ratio, "stem": args.stem} if args.ratio is not None else {"keep": args.keep}),
        "encoder_inner": list(model_cfg.encoder_inner) if model_cfg.encoder_inner else None,
        "encoder_widths": list(model_cfg.encoder_widths) if model_cfg.encoder_widths else None,
        "before": before,
        "after": after,
        "macs_ratio": round(before["macs_per_patch"] / max(after["macs_per_patch"], 1), 3),
    }
    (out / "prune.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"pruned: {before['params']} -> {after['params']} parameters, {before['macs_per_patch']} -> "
        f"{after['macs_per_patch']} MACs per patch ({report['macs_ratio']}x fewer): {out / 'pruned.pt'}"
    )
    if args.epochs == 0:
        return 0
    from ips.training.finetune import finetune

    tune = [f"train.epochs={args.epochs}", "train.warmup_epochs=0", "train.takeoff_epoch=null"]
    tune += [f"train.device={args.device}"] if args.device else []
    cfg = override_loaded(cfg, [*tune, *args.overrides])
    manifest = args.manifest or cfg.data.manifest
    if not manifest:
        raise ConfigError(
            "no manifest to fine-tune on: give --manifest (the checkpoint has no data.manifest)"
        )
    with torch.no_grad():
        weights = {k: v.detach().clone() for k, v in pruned.state_dict().items()}
    result = finetune(cfg, weights, manifest=manifest, run_dir=out, show_progress=not args.quiet)
    print(f"fine-tuned: {result.run_dir / 'checkpoints' / 'best.pt'} ({result.monitor} {result.best})")
    return 0


def _pruned(
    model: IPSModel, cfg: ModelConfig, *, ratio: float | None, keep: float | None, stem: float = 0.0
) -> tuple[IPSModel, ModelConfig]:
    """(pruned model, its ModelConfig): channel pruning by `ratio` (and the stem's by `stem`), or the
    ViT's token keep share."""
    from ips.model.ips_model import build_model
    from ips.model.pruning import prune_model
    from ips.model.token_vit import TOKEN_VITS

    if ratio is not None:
        return prune_model(model, cfg, ratio=ratio, stem=stem)
    if cfg.encoder not in TOKEN_VITS:
        raise ConfigError(
            f"--keep: applies to the token-pruning ViTs ({', '.join(TOKEN_VITS)}), not {cfg.encoder!r}"
        )
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"--keep: must be in (0, 1], got {keep}")
    new_cfg = dataclasses.replace(cfg, token_keep=keep)
    new = build_model(new_cfg)
    new.load_state_dict(model.state_dict())
    return new.eval(), new_cfg


def _size(model: IPSModel, cfg: ModelConfig) -> dict[str, int]:
    """Parameters of the model and its encoder, and the encoder's MACs per patch (eval mode)."""
    import torch

    from ips.model.ips_model import expected_patch_shape
    from ips.model.macs import count_macs

    model.eval()
    x = torch.zeros(1, *expected_patch_shape(cfg))
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "encoder_params": sum(p.numel() for p in model.encoder.parameters()),
        "macs_per_patch": count_macs(model.encoder, x),
    }


def _remove_previous(out: Path) -> None:
    from ips.training.rundir import RunLock, remove_run

    if not out.is_dir():
        return
    with RunLock(out):
        remove_run(out)
    for name in ("pruned.pt", "prune.json"):
        (out / name).unlink(missing_ok=True)
