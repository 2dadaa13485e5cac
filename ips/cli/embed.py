"""`ips embed STORE... --encoder NAME [--grid G] [--name F] ...`: precompute features into the stores."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.cli import parse_shard, take_shard
from ips.cli._threads import add_threads, apply_threads


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "embed",
        help="precompute patch features with a frozen encoder",
        description="Run a frozen encoder over every patch of a grid and write features/<name> into each "
        "store (streaming; an interrupted run resumes). Train on them with data.mode=features.",
    )
    p.add_argument("stores", nargs="+", metavar="STORE", help="stores made by `ips prep`")
    p.add_argument("--encoder", required=True, help="encoder name (ours, e.g. ips_resnet18, or a timm model)")
    p.add_argument(
        "--pretrained",
        default="false",
        help="weights: a local file, 'true' (timm hub, needs network) or 'false' (default)",
    )
    p.add_argument("--grid", default="default", help="grid to embed (default: default)")
    p.add_argument("--name", default="default", help="feature set name, features/<name> (default: default)")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=256,
        help="patches per forward pass and per written chunk (default 256)",
    )
    p.add_argument(
        "--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ... (default auto)"
    )
    p.add_argument(
        "--dtype",
        choices=("float16", "float32"),
        default="float16",
        help="stored feature dtype (default float16)",
    )
    p.add_argument(
        "--read-threads", type=int, default=4, help="threads reading and decoding patches (default 4)"
    )
    p.add_argument("--overwrite", action="store_true", help="recompute a feature set that already exists")
    p.add_argument(
        "--encoder-norm",
        choices=("group", "batch"),
        default=None,
        help="ips_* encoders: GroupNorm or BatchNorm (default: what `ips pretrain` recorded in encoder.json "
        "beside --pretrained, else group)",
    )
    p.add_argument(
        "--shard",
        type=parse_shard,
        default=None,
        metavar="i/n",
        help="only the i-th (0-based) of n splits of the sorted stores: one job-array task each, as in ips prep",
    )
    add_threads(p)
    p.set_defaults(func=run)


def shard_stores(stores: list[str], shard: tuple[int, int] | None) -> list[str]:
    """Sorted, de-duplicated stores; with `shard (i, n)` every n-th from the i-th, so n tasks given the same
    list split it without overlap or gaps, whatever order each was given."""
    return take_shard(sorted(set(stores)), shard)


def _norm(args: argparse.Namespace) -> str | None:
    """The normalisation of an ips_* encoder: --encoder-norm, else the one `ips pretrain` recorded beside
    the --pretrained file (encoder.json), else the encoder's default. None for other encoders."""
    if not args.encoder.startswith("ips_"):
        return None
    if args.encoder_norm:
        return args.encoder_norm
    weights = _pretrained(args.pretrained)
    if isinstance(weights, str):
        import json

        meta = Path(weights).with_name("encoder.json")
        if meta.is_file():
            return json.loads(meta.read_text()).get("encoder_norm")
    return None


def _pretrained(value: str) -> bool | str:
    low = value.lower()
    if low in ("true", "yes", "1"):
        return True
    if low in ("false", "no", "0", ""):
        return False
    return value


def run(args: argparse.Namespace) -> int:
    import torch  # here, not at import: building the `ips` parser must stay fast

    from ips.config import ConfigError
    from ips.data.store import StoreError, open_store
    from ips.infer.embed import embed_store
    from ips.model.encoders import build_encoder
    from ips.runtime import resolve_device

    if args.chunk_size < 1:
        raise ConfigError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    apply_threads(args.threads)
    device = resolve_device(args.device, key="--device")
    # weights not loaded from a file start from a fixed seed: every run and every --shard task of a cohort
    # embeds with the same encoder
    torch.manual_seed(0)
    encoders: dict[tuple[int, int, int], torch.nn.Module] = {}  # one per (channels, dims, patch size)
    failures: dict[str, str] = {}
    stores = shard_stores(list(args.stores), args.shard)
    for store in stores:
        try:
            opened = open_store(store)
            info = opened.grid(args.grid)
            key = (opened.channels, opened.spatial_dims, min(info.patch_size))
            if key not in encoders:  # one encoder per patch shape; ConfigError (bad name/size) is exit 2
                encoders[key] = build_encoder(
                    args.encoder,
                    in_chans=key[0],
                    spatial_dims=key[1],
                    patch_size=key[2],
                    pretrained=_pretrained(args.pretrained),
                    norm=_norm(args),
                ).to(device)
            result = embed_store(
                store,
                encoders[key],
                grid=args.grid,
                name=args.name,
                chunk_size=args.chunk_size,
                device=device,
                encoder_name=args.encoder,
                dtype=args.dtype,
                read_threads=args.read_threads,
                overwrite=args.overwrite,
            )
            print(f"{store}: features/{result.name} ({result.dim} per patch, {info.n_patches} patches)")
        except (StoreError, ValueError, OSError) as e:
            if isinstance(e, ConfigError):
                raise
            failures[store] = str(e).splitlines()[0] if str(e) else type(e).__name__
    for store, reason in failures.items():
        print(f"ips embed: failed: {store}: {reason}", file=sys.stderr)
    if failures:
        print(f"ips embed: {len(failures)} of {len(stores)} stores failed", file=sys.stderr)
    return 1 if failures else 0
