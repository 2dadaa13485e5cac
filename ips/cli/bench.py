"""`ips bench memory|throughput|encoders|cascade [--json FILE] [...]`: the measurements behind the README's claims.

`--json FILE` writes `{"memory" | "throughput" | "encoders" | "cascade": {...}}` (a stable contract; cascade's
five contract keys also at the top level); other
top-level keys of an existing FILE are kept, so one file can hold all three.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data_prep.options import CODECS  # light: the prep parser is built from it too
from ips.cli._threads import bounded_threads


def _int_list(text: str) -> list[int]:
    from ips.bench.common import parse_int_list  # imports torch: not while building the parser

    try:
        return parse_int_list(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of N, e.g. 1000,10k,250k ({e})"
        ) from None


def _common(p: argparse.ArgumentParser) -> None:
    from ips.cli._common import add_device
    from ips.cli._threads import _count

    p.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    add_device(p)
    p.add_argument(
        "--threads",
        type=_count,
        default=0,
        metavar="N",
        help="torch CPU threads (default 0: torch's own, one per core; more than the cores is lowered)",
    )


def _selection(p: argparse.ArgumentParser, memory_size: int, iter_size: int) -> None:
    """The selection's sizes under the config's own names; `--M` / `--I` stay accepted, hidden."""
    p.add_argument(
        "--memory-size",
        type=int,
        default=memory_size,
        metavar="M",
        help=f"selection.memory_size: patches kept per slide (default {memory_size})",
    )
    p.add_argument(
        "--iter-size",
        type=int,
        default=iter_size,
        metavar="I",
        help=f"selection.iter_size: patches per streamed chunk (default {iter_size})",
    )
    p.add_argument("--M", dest="memory_size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--I", dest="iter_size", type=int, help=argparse.SUPPRESS)


def _throughput_parser(kinds: argparse._SubParsersAction) -> None:
    t = kinds.add_parser(
        "throughput",
        help="selection pass vs. encoder only; loader vs. raw zarr",
    )
    t.add_argument("--n", type=int, default=2048, help="patches (default 2048)")
    t.add_argument("--patch-size", type=int, default=64, help="patch side in pixels (default 64)")
    t.add_argument(
        "--encoder", default="ips_resnet10", help="encoder name, ours or timm's (default ips_resnet10)"
    )
    _selection(t, 32, 256)
    t.add_argument(
        "--read-threads", type=int, default=2, help="decode threads of the patch source (default 2)"
    )
    t.add_argument("--prefetch", type=int, default=2, help="chunks read ahead (default 2)")
    t.add_argument(
        "--repeats", type=int, default=5, help="interleaved repeats; the fastest of each counts (default 5)"
    )
    t.add_argument(
        "--store-dir",
        type=Path,
        default=None,
        help="keep the generated store here (default a temporary one)",
    )
    t.add_argument(
        "--codec",
        nargs="+",
        choices=CODECS,
        default=["blosc-lz4"],
        help="pixel codec(s) of the generated store, as `ips prep --codec`; several: one store each, "
        "measured side by side in the same run (default blosc-lz4)",
    )
    t.add_argument(
        "--codec-level", type=int, default=None, help="quality of a lossy codec (default each codec's own)"
    )
    _common(t)
    t.set_defaults(func=run_throughput_cmd)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure memory, selection throughput and encoder cost",
        description=__doc__.split("\n\n")[0],
    )
    kinds = p.add_subparsers(dest="bench", metavar="KIND", required=True)

    m = kinds.add_parser(
        "memory",
        help="peak memory of a training step against N (IPS and the naive baseline)",
    )
    m.add_argument(
        "--n",
        type=_int_list,
        default=[1000, 10000, 100000, 250000],
        help="numbers of patches per slide, comma-separated (k, M suffixes allowed; default "
        "1000,10000,100000,250000)",
    )
    m.add_argument("--patch-size", type=int, default=16, help="patch side in pixels (default 16)")
    m.add_argument(
        "--encoder", default="ips_cnn_tiny", help="encoder name, ours or timm's (default ips_cnn_tiny)"
    )
    _selection(m, 32, 256)
    m.add_argument(
        "--batch-size",
        type=int,
        default=2,
        metavar="B",
        help="train.batch_size: slides per batch (default 2)",
    )
    m.add_argument("--B", dest="batch_size", type=int, help=argparse.SUPPRESS)
    m.add_argument(
        "--read-threads", type=int, default=2, help="decode threads of the patch source (default 2)"
    )
    m.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    m.add_argument(
        "--naive-budget-gb",
        type=float,
        default=4.0,
        help="the naive baseline runs at increasing N until its peak (host RSS on CPU, device memory "
        "on CUDA) exceeds this many GB (default 4)",
    )
    m.add_argument("--plot", type=Path, default=None, help="write the figure (PNG) here (default none)")
    m.add_argument(
        "--store-dir",
        type=Path,
        default=None,
        help="keep the generated stores here and reuse them (default a temporary folder)",
    )
    m.add_argument("--timeout", type=float, default=1200.0, help="seconds per measurement (default 1200)")
    _common(m)
    m.set_defaults(func=run_memory_cmd)

    _throughput_parser(kinds)

    e = kinds.add_parser(
        "encoders",
        help="parameters, MACs, latency and memory per patch of the encoders",
    )
    e.add_argument("--encoders-2d", default=None, help="comma-separated names (default ours + timm resnet18)")
    e.add_argument("--encoders-3d", default=None, help="comma-separated names (default ours)")
    e.add_argument("--patch-2d", type=int, default=224, help="2D patch side in pixels (default 224)")
    e.add_argument("--patch-3d", type=int, default=64, help="3D patch side in voxels (default 64)")
    e.add_argument("--batch-2d", type=int, default=8, help="patches per timed 2D batch (default 8)")
    e.add_argument("--batch-3d", type=int, default=2, help="patches per timed 3D batch (default 2)")
    e.add_argument("--in-chans-2d", type=int, default=3, help="channels of 2D patches (default 3, RGB)")
    e.add_argument("--in-chans-3d", type=int, default=1, help="channels of 3D patches (default 1, CT/MR)")
    e.add_argument("--repeats", type=int, default=3, help="timed repeats; the fastest counts (default 3)")
    _common(e)
    e.set_defaults(func=run_encoders_cmd)

    _learn_parser(kinds)
    _cascade_parser(kinds)


def _cascade_parser(kinds: argparse._SubParsersAction) -> None:
    c = kinds.add_parser(
        "cascade",
        help="selection pass: the full pass vs the cascade (coarse top-K, then exact top-M) on the same slide",
    )
    c.add_argument("--n", type=_int_list, default=[10_000], help="patches per slide (default 10k)")
    c.add_argument("--patch-size", type=int, default=32, help="patch side in pixels (default 32)")
    c.add_argument("--encoder", default="ips_resnet10", help="encoder name (default ips_resnet10)")
    _selection(c, 32, 256)
    c.add_argument(
        "--candidates",
        type=float,
        default=0.1,
        help="selection.cascade_candidates: share of N (<= 1) or count kept by the coarse pass (default 0.1)",
    )
    c.add_argument("--factor", type=int, default=4, help="selection.cascade_factor (default 4)")
    c.add_argument(
        "--distill-steps", type=int, default=100, help="steps teaching the coarse scorer (default 100)"
    )
    c.add_argument(
        "--calibration-patches",
        type=int,
        default=None,
        help="patches of the slide the scorer learns from (default N, at most 4k)",
    )
    c.add_argument(
        "--repeats", type=int, default=1, help="interleaved repeats; the fastest counts (default 1)"
    )
    c.add_argument(
        "--read-threads", type=int, default=2, help="decode threads of the patch source (default 2)"
    )
    c.add_argument(
        "--store-dir",
        type=Path,
        default=None,
        help="keep the generated stores here (default a temporary one)",
    )
    _common(c)
    c.set_defaults(func=run_cascade_cmd)


def _learn_parser(kinds: argparse._SubParsersAction) -> None:
    lp = kinds.add_parser(
        "learn",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="learnability matrix: task families x seeds through the documented commands",
    )
    lp.add_argument("--families", default="a,b,c,d,e,f", help="comma-separated family letters")
    lp.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (data and training)")
    lp.add_argument("--out", type=Path, default=Path("runs/learn"), help="work folder (data, runs)")
    lp.add_argument("--slides", type=int, default=None, help="slides per family (none: its full size)")
    lp.add_argument("--epochs", type=int, default=None, help="train.epochs (none: the config's)")
    lp.add_argument("--pretrain", action="store_true", help="run `ips pretrain` first (documented path)")
    lp.add_argument("--digits", type=Path, default=None, help="MNIST CSV for the mark families (b, c, f)")
    lp.add_argument(
        "--configs",
        type=Path,
        default=None,
        help="folder of demo.yaml and volume3d.yaml (none: the repository's configs/)",
    )
    lp.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    lp.add_argument("--threads", type=int, default=1, help="torch threads")
    lp.add_argument(
        "--grid", action="append", default=[], help="a further grid in every store, NAME:LEVEL:PATCH:STRIDE"
    )
    lp.add_argument("overrides", nargs="*", metavar="key=value", help="extra `ips train` overrides")
    lp.set_defaults(func=run_learn_cmd)


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [n.strip() for n in text.split(",") if n.strip()]


def run_memory_cmd(args: argparse.Namespace) -> int:
    from ips.bench.common import write_json
    from ips.bench.memory import memory_table, run_memory

    result = run_memory(
        args.n,
        patch_size=args.patch_size,
        memory_size=args.memory_size,
        iter_size=args.iter_size,
        batch_size=args.batch_size,
        encoder=args.encoder,
        device=args.device,
        threads=bounded_threads(args.threads) or 0,
        read_threads=args.read_threads,
        store_dir=args.store_dir,
        naive=not args.no_naive,
        naive_budget_bytes=int(args.naive_budget_gb * 2**30),
        timeout=args.timeout,
    )
    print(memory_table(result))
    if args.json:
        print(f"wrote {write_json(args.json, 'memory', result)}")
    if args.plot:
        from ips.bench.plot import plot_memory

        print(f"wrote {plot_memory(result, args.plot)}")
    return 0 if all(r.get("status") == "ok" for r in result["rows"]) else 1


def run_throughput_cmd(args: argparse.Namespace) -> int:
    from ips.bench.common import write_json
    from ips.bench.throughput import run_throughput, throughput_table

    result = run_throughput(
        args.n,
        encoder=args.encoder,
        patch_size=args.patch_size,
        memory_size=args.memory_size,
        iter_size=args.iter_size,
        device=args.device,
        threads=bounded_threads(args.threads) or 0,
        read_threads=args.read_threads,
        prefetch=args.prefetch,
        repeats=args.repeats,
        store_dir=args.store_dir,
        codecs=args.codec,
        codec_level=args.codec_level,
    )
    print(throughput_table(result))
    if args.json:
        print(f"wrote {write_json(args.json, 'throughput', result)}")
    return 0


def run_encoders_cmd(args: argparse.Namespace) -> int:
    from ips.bench.common import write_json
    from ips.bench.encoders import encoders_table, run_encoders

    result = run_encoders(
        encoders_2d=_names(args.encoders_2d),
        encoders_3d=_names(args.encoders_3d),
        patch_2d=args.patch_2d,
        patch_3d=args.patch_3d,
        batch_2d=args.batch_2d,
        batch_3d=args.batch_3d,
        in_chans_2d=args.in_chans_2d,
        in_chans_3d=args.in_chans_3d,
        repeats=args.repeats,
        device=args.device,
        threads=bounded_threads(args.threads) or 0,
    )
    print(encoders_table(result))
    if args.json:
        print(f"wrote {write_json(args.json, 'encoders', result)}")
    return 0


def run_cascade_cmd(args: argparse.Namespace) -> int:
    from ips.bench.cascade import CascadeBench, cascade_table, run_cascade_bench
    from ips.bench.common import write_json
    from ips.errors import ConfigError

    threads = bounded_threads(args.threads) or 0
    if threads:
        import torch

        torch.set_num_threads(threads)
    results = []
    for n in args.n:
        try:
            bench = CascadeBench(
                n_patches=n,
                calibration_patches=args.calibration_patches,
                encoder=args.encoder,
                patch_size=args.patch_size,
                memory_size=args.memory_size,
                iter_size=args.iter_size,
                candidates=args.candidates,
                factor=args.factor,
                distill_steps=args.distill_steps,
                repeats=args.repeats,
                read_threads=args.read_threads,
                device=args.device,
            )
        except ValueError as e:
            raise ConfigError(f"ips bench cascade: {e}") from None
        results.append(run_cascade_bench(bench, store_dir=args.store_dir))
        print(cascade_table(results[-1]))
    if args.json:
        # one N: the contract's keys at the top of the payload; several: one row each under "rows"
        payload = results[0] if len(results) == 1 else {**results[0], "rows": results}
        # the contract names its five keys at the top of the file; the whole payload is under "cascade"
        contract = ("n_patches", "full_seconds", "cascade_seconds", "ratio", "recall_top_m")
        print(f"wrote {write_json(args.json, 'cascade', payload, top_level=contract)}")
    return 0


def run_learn_cmd(args: argparse.Namespace) -> int:
    from ips.bench.learn import (
        LearnSettings,
        default_configs,
        learn_table,
        parse_families,
        run_learn,
        seeds_of,
        write_result,
    )
    from ips.errors import ConfigError

    try:
        families = parse_families(args.families)
        seeds = seeds_of(args.seeds)
    except ValueError as e:
        raise ConfigError(f"--families/--seeds: {e}") from None
    from ips.synthetic.families import family

    needs = [k for k in families if family(k).needs_digits]
    if needs and (args.digits is None or not args.digits.is_file()):
        raise ConfigError(
            f"--digits: families {','.join(needs)} need an MNIST CSV of handwritten digits "
            f"({'not given' if args.digits is None else f'{args.digits} does not exist'})"
        )
    settings = LearnSettings(
        families=families,
        seeds=seeds,
        out=args.out,
        configs=args.configs or default_configs(),
        digits=args.digits,
        n_slides=args.slides,
        epochs=args.epochs,
        pretrain=args.pretrain,
        threads=args.threads,
        overrides=tuple(args.overrides),
        grids=tuple(args.grid),
    )
    result = run_learn(settings)
    print(learn_table(result))
    if args.json:
        print(f"wrote {write_result(args.json, result)}")
    return 0
