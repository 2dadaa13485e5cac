"""`ips embed STORE... --encoder NAME [--grid G] [--name F] ...`: precompute features into the stores."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.cli import parse_shard, take_shard
from ips.cli._common import add_device, add_overwrite, add_quiet
from ips.cli._threads import add_threads, apply_threads
from ips.foundation import is_foundation, list_foundation


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "embed",
        help="precompute patch features with a frozen encoder",
        description="Run a frozen encoder over every patch of a grid and write features/<name> into each "
        "store (streaming; an interrupted run resumes). Train on them with data.mode=features.",
    )
    p.add_argument("stores", nargs="+", metavar="STORE", help="stores made by `ips prep`")
    p.add_argument(
        "--encoder",
        required=True,
        help=f"encoder name: a pathology foundation encoder ({', '.join(list_foundation())}), one of ours "
        "(e.g. ips_resnet18), or a timm model",
    )
    p.add_argument(
        "--pretrained",
        default="false",
        help="weights: a local file, 'true' (the hub: needs network, and a token for gated models) or "
        "'false' (default: random weights)",
    )
    p.add_argument(
        "--grid", default="default", help="grid to embed, as data.grid and prep --grid (default 'default')"
    )
    p.add_argument("--name", default="default", help="feature set name, features/<name> (default 'default')")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=256,
        help="patches per forward pass and per written chunk (default 256)",
    )
    add_device(p)
    p.add_argument(
        "--dtype",
        choices=("float16", "float32"),
        default="float16",
        help="stored feature dtype (default float16)",
    )
    p.add_argument(
        "--read-threads", type=int, default=4, help="threads reading and decoding patches (default 4)"
    )
    add_overwrite(p, "recompute a feature set that already exists (default resume or skip it)")
    add_quiet(p, "no per-store lines")
    p.add_argument(
        "--encoder-norm",
        choices=("group", "batch"),
        default=None,
        help="ips_* encoders: GroupNorm or BatchNorm (default what `ips pretrain` recorded in encoder.json "
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


def scale_warning(encoder: str, mpp: float | None) -> str | None:
    """Why a foundation encoder's features of a grid at `mpp` um/px may disappoint (it was trained at
    another magnification), or None."""
    from ips.foundation import foundation_spec, is_foundation

    if mpp is None or not is_foundation(encoder):
        return None
    spec = foundation_spec(encoder)
    if abs(mpp / spec.mpp - 1) <= 0.25:
        return None
    return (
        f"the grid is at {mpp:.3g} um/px, {spec.name} was trained at {spec.mpp} um/px; "
        f"prep a grid for it with `ips prep ... --encoder {spec.name}`"
    )


def run(args: argparse.Namespace) -> int:
    import torch  # here, not at import: building the `ips` parser must stay fast

    from ips.config import ConfigError
    from ips.data.store import open_store
    from ips.errors import failure_summary, run_each
    from ips.infer.embed import embed_store, grid_mpp
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
    stores = shard_stores(list(args.stores), args.shard)
    if is_foundation(args.encoder) and _pretrained(args.pretrained) is False:
        print(
            f"warning: {args.encoder} with random weights (no --pretrained): these features are not the "
            "pretrained model's; give its weights file",
            file=sys.stderr,
        )

    def encoder_for(key: tuple[int, int, int]) -> torch.nn.Module:
        if key not in encoders:  # one encoder per patch shape
            weights = _pretrained(args.pretrained)
            encoder = build_encoder(
                args.encoder,
                in_chans=key[0],
                spatial_dims=key[1],
                patch_size=key[2],
                pretrained=weights,
                norm=_norm(args),
            )
            if isinstance(weights, str) and getattr(encoder, "weights_path", None) is None:
                encoder.weights_path = Path(weights)  # the provenance's weights hash
            encoders[key] = encoder.to(device)
        return encoders[key]

    def one(store: str) -> None:
        opened = open_store(store)
        info = opened.grid(args.grid)
        # a foundation encoder takes any patch size (it resizes): one copy for the cohort, not one per size
        size = 0 if is_foundation(args.encoder) else min(info.patch_size)
        encoder = encoder_for((opened.channels, opened.spatial_dims, size))
        result = embed_store(
            store,
            encoder,
            grid=args.grid,
            name=args.name,
            chunk_size=args.chunk_size,
            device=device,
            encoder_name=args.encoder,
            dtype=args.dtype,
            read_threads=args.read_threads,
            overwrite=args.overwrite,
        )
        warning = scale_warning(args.encoder, grid_mpp(opened, args.grid))
        if warning:
            print(f"warning: {store}: {warning}", file=sys.stderr)
        if not args.quiet:
            print(f"{store}: features/{result.name} ({result.dim} per patch, {info.n_patches} patches)")

    # a bad encoder name or --pretrained file is bad usage (exit 2), not a failure of each store
    _, failures = run_each(stores, one, fatal=(ConfigError,))
    for line in failure_summary("embed", failures, len(stores)):
        print(line, file=sys.stderr)
    return 1 if failures else 0
