"""`ips prep SRC... --out DIR`: slides and volumes into stores, several at once, with a summary.

Inputs are sorted (as given) and de-duplicated; `--shard i/n` keeps every n-th starting at i (0-based,
`0 <= i < n`, as SLURM's `--array=0-(n-1)`), so n jobs given the same inputs split them without
overlap. `--workers N` converts N inputs at once in separate processes, each with
`--threads` (default CPUs / N) decode/encode threads; `--dask ADDRESS | local:N` runs each input as a
Dask task instead (`data_prep.dask_run`). `--out` may be `s3://` or `gs://` (`data_prep.remote`).
One line per failed input goes to stderr as it
happens, and a summary table to stdout at the end. Exit status: 0 all done (or skipped), 1 some inputs
failed (the others were still converted), 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from data_prep.heap import return_large_blocks
from data_prep.options import CODECS, DEFAULT_CODEC, STORE_FROM, PrepOptions
from data_prep.readers import READERS
from data_prep.workers import DIED, die_with_parent, run_pool
from ips.errors import EXIT_OK, EXIT_SOME_FAILED, ConfigError, run_each
from ips.foundation import foundation_spec, list_foundation

if TYPE_CHECKING:  # the pipeline (zarr, scikit-image) loads only when prep runs: `ips --help` stays fast
    from data_prep.convert import PrepResult


def parse_shard(text: str) -> tuple[int, int]:
    """`"i/n"` -> `(i, n)` with `0 <= i < n`."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"need 0 <= i < n (0-based), got {text!r}")
    return i, n


def take_shard(ordered: list[str], shard: tuple[int, int] | None) -> list[str]:
    """Every n-th of the sorted `ordered` from the i-th (`shard (i, n)`; None: all): n job-array tasks
    given the same inputs, in any order, split them without overlap or gaps."""
    return ordered if shard is None else ordered[shard[0] :: shard[1]]


def out_location(text: str) -> Path | str:
    """`--out`: a local folder (Path) or an `s3://` / `gs://` URL (kept as text)."""
    from ips.format.location import WRITABLE_SCHEMES, is_remote, local_path, scheme_of

    try:
        scheme = scheme_of(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if is_remote(text) and scheme not in WRITABLE_SCHEMES:
        raise argparse.ArgumentTypeError(f"{text}: {scheme}:// is read-only; write to s3:// or gs://")
    return text.rstrip("/") if is_remote(text) else local_path(text)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prep",
        help="convert slides / volumes into zarr stores with tissue masks and patch grids",
        description="Convert each SRC into DIR/<slide_id>.zarr (slide_id = file name without its "
        "extensions), with a thumbnail DIR/<slide_id>.thumbnail.png. Complete stores are "
        "skipped (or get a new --grid); partial ones are redone; --overwrite redoes complete ones.",
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help="slide or volume files")
    p.add_argument(
        "--out",
        required=True,
        type=out_location,
        metavar="DIR",
        help="output folder, or s3://bucket/prefix, gs://bucket/prefix (object storage)",
    )
    p.add_argument(
        "--patch-size",
        type=int,
        default=None,
        metavar="P",
        help="patch side in pixels (default 256, or the --encoder's input size)",
    )
    p.add_argument("--stride", type=int, default=None, metavar="S", help="grid step in pixels (default P)")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--level", type=int, default=0, metavar="L", help="pyramid level of the grid (default 0)"
    )
    where.add_argument(
        "--mpp",
        type=float,
        default=None,
        metavar="X",
        help="pick the level nearest X micrometers per pixel (needs the source's mpp)",
    )
    where.add_argument(
        "--encoder",
        default=None,
        metavar="NAME",
        help="cut the grid for a foundation encoder: its mpp and (unless --patch-size) its input size "
        f"({', '.join(list_foundation())})",
    )
    p.add_argument(
        "--source-mpp",
        type=float,
        default=None,
        metavar="X",
        help="the scan's micrometers per pixel at level 0, for files whose metadata lack it (or are wrong)",
    )
    p.add_argument(
        "--min-tissue",
        type=float,
        default=0.5,
        metavar="F",
        help="keep patches with at least this tissue fraction (default 0.5)",
    )
    _add_run_options(p)
    _add_store_options(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo complete stores (default skip them, finish partial ones)",
    )
    p.add_argument("--allow-empty", action="store_true", help="keep stores whose grid is empty")
    p.add_argument("--quiet", action="store_true", help="no progress bar (failures and the summary stay)")
    p.add_argument("--no-thumbnail", action="store_true", help="do not draw thumbnails")
    p.set_defaults(func=run)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Grid name and where/how the conversions run (processes, threads, shards, Dask)."""
    p.add_argument(
        "--grid",
        dest="grid_name",
        default="default",
        metavar="NAME",
        help="name of the grid to make, read by data.grid and `ips embed --grid` (default 'default')",
    )
    p.add_argument("--grid-name", dest="grid_name", help=argparse.SUPPRESS)  # the old spelling
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes; one that dies fails only its input (default 1)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        metavar="T",
        help="decode/encode threads per process (default CPUs / workers, at most 8)",
    )
    p.add_argument(
        "--shard",
        type=parse_shard,
        default=None,
        metavar="i/n",
        help="only the i-th (0-based) of n deterministic splits of the sorted inputs",
    )
    p.add_argument(
        "--dask",
        default=None,
        metavar="ADDRESS",
        help="run the inputs as Dask tasks on the scheduler at ADDRESS, or local:N (N local worker processes)",
    )


def _add_store_options(p: argparse.ArgumentParser) -> None:
    """How pixels are read and stored: reader, codec, the store's first level."""
    p.add_argument(
        "--reader",
        choices=sorted(READERS),
        default=None,
        help="force a reader backend (default chosen from the file's content)",
    )
    p.add_argument(
        "--codec",
        choices=CODECS,
        default=DEFAULT_CODEC,
        help="pixel codec: lossless zstd (default), blosc-lz4 (faster reads, larger store), none; lossy for "
        "uint8 RGB/grey slides: "
        "jpeg, jpegxl, webp",
    )
    p.add_argument(
        "--codec-level",
        type=int,
        default=None,
        metavar="Q",
        help="quality 1-100 of a lossy codec (default jpeg 90, jpegxl 93, webp 90) or a lossless codec's level",
    )
    p.add_argument(
        "--store-from",
        choices=STORE_FROM,
        default="level0",
        help="level0: store the source's level 0 and the pyramid below (default); grid: begin the store at "
        "the grid's level (--level / --mpp), so a 20x grid on a 40x scan stores a quarter of the pixels",
    )


def _work(source: str, out: Path | str, options: PrepOptions, reader: str | None) -> PrepResult:
    from data_prep.convert import prep_file

    return_large_blocks()  # in a worker process too
    return prep_file(source, out, options=options, reader=reader)


def _failed(source: str, reason: str) -> PrepResult:
    from data_prep.convert import PrepResult

    return PrepResult(source, Path(source).name, "failed", reason=reason)


__all__ = ["die_with_parent", "parse_shard", "register", "summary_table", "take_shard"]


def _select_inputs(sources: list[str], shard: tuple[int, int] | None) -> tuple[list[str], list[PrepResult]]:
    """Sorted, de-duplicated inputs of this shard, and failures for duplicate slide ids."""
    from data_prep.convert import PrepResult, slide_id_of
    from ips.errors import PrepError

    ordered = sorted(dict.fromkeys(sources))
    owner: dict[str, str] = {}
    duplicates: dict[str, str] = {}
    for src in ordered:  # judged on all inputs, so every shard agrees
        try:
            sid = slide_id_of(src)
        except PrepError:
            continue
        if sid in owner:
            duplicates[src] = f"duplicate slide_id {sid!r} (also made from {owner[sid]})"
        else:
            owner[sid] = src
    ordered = take_shard(ordered, shard)
    keep = [s for s in ordered if s not in duplicates]
    failed = [PrepResult(s, Path(s).name, "failed", reason=duplicates[s]) for s in ordered if s in duplicates]
    return keep, failed


def _report(result: PrepResult, *, results: list[PrepResult], bar: object) -> None:
    results.append(result)
    if result.status == "failed":
        msg = f"ips prep: FAILED {result.source}: {result.reason}"
        getattr(bar, "write", print)(msg, file=sys.stderr)
    for warning in result.warnings:
        getattr(bar, "write", print)(f"ips prep: warning: {result.source}: {warning}", file=sys.stderr)
    getattr(bar, "update", lambda n: None)(1)


def summary_table(results: list[PrepResult]) -> str:
    """A plain-text table: one row per input, failures last."""
    order = {"failed": 1}
    rows = [("slide_id", "status", "patches", "seconds", "store / reason")]
    for r in sorted(results, key=lambda r: (order.get(r.status, 0), r.slide_id)):
        detail = r.reason if r.status == "failed" else str(r.store)
        rows.append(
            (
                r.slide_id,
                r.status,
                "" if r.n_patches is None else str(r.n_patches),
                f"{r.seconds:.1f}" if r.seconds else "",
                detail,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "grid added", "failed")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) or "nothing to do")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    return_large_blocks()  # resident memory that does not creep up with the slide (data_prep.heap)
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {args.threads}")
    procs = _processes(args)  # 0: a remote Dask cluster, whose workers pick their own thread counts
    cores = os.cpu_count() or 1
    if args.threads > cores and procs:  # thousands of threads exhaust the process, they do not speed it up
        print(
            f"warning: --threads {args.threads} is more than the {cores} cores; using {cores}",
            file=sys.stderr,
        )
        args.threads = cores
    threads = args.threads or (max(1, min(8, (os.cpu_count() or 1) // procs)) if procs else 0)
    mpp, patch_size = grid_scale(args)
    options = PrepOptions(
        patch_size=patch_size,
        stride=args.stride,
        level=args.level,
        mpp=mpp,
        source_mpp=args.source_mpp,
        min_tissue=args.min_tissue,
        grid_name=args.grid_name,
        codec=args.codec,
        codec_level=args.codec_level,
        store_from=args.store_from,
        threads=threads,
        overwrite=args.overwrite,
        allow_empty=args.allow_empty,
        thumbnail=not args.no_thumbnail,
    )
    if isinstance(args.out, Path) and args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} exists and is not a directory")
    if isinstance(args.out, str):  # a remote --out: a missing bucket or refused credentials, once
        from ips.format.location import check_writable

        check_writable(args.out)
    else:  # a local one: a read-only or unwritable folder, a file on its path, once
        _check_local_out(args.out)
    inputs, results = _select_inputs(list(args.sources), args.shard)
    for r in results:
        print(f"ips prep: FAILED {r.source}: {r.reason}", file=sys.stderr)
    from tqdm import tqdm

    quiet = True if args.quiet else None  # None: tqdm draws only on a terminal
    with tqdm(total=len(inputs), desc="ips prep", unit="input", disable=quiet, file=sys.stderr) as bar:
        report = partial(_report, results=results, bar=bar)
        work = partial(_work, out=args.out, options=options, reader=args.reader)
        if args.dask:
            from data_prep.dask_run import run_dask

            run_dask(inputs, args.out, options, args.reader, args.dask, report)
        elif args.workers == 1 or len(inputs) <= 1:

            def one(src: str) -> PrepResult:
                bar.set_postfix_str(Path(src).name, refresh=True)
                return work(src)

            # prep_file reports what it can name; anything else it raises is one line for its input
            done, failures = run_each(inputs, one, name=lambda s: Path(s).name)
            by_source = dict(done)
            crashed = {f.path: f.reason for f in failures}
            for src in inputs:
                report(by_source[src] if src in by_source else _failed(src, crashed[src]))
        else:
            run_pool(
                inputs,
                work,
                workers=args.workers,
                report=report,
                failed=lambda src, reason: _failed(
                    src, f"{reason}; rerun to retry" if reason == DIED else reason
                ),
                log=lambda line: bar.write(line, file=sys.stderr),
            )
    print(summary_table(results))
    return EXIT_SOME_FAILED if any(r.status == "failed" for r in results) else EXIT_OK


def grid_scale(args: argparse.Namespace) -> tuple[float | None, int]:
    """`(mpp, patch_size)` of the grid: `--mpp` / `--patch-size`, or with `--encoder NAME` the
    magnification and input size that encoder was trained at (an explicit --patch-size still wins)."""
    if args.encoder is None:
        return args.mpp, 256 if args.patch_size is None else args.patch_size
    spec = foundation_spec(args.encoder, key="--encoder")
    return spec.mpp, spec.input_size if args.patch_size is None else args.patch_size


def _check_local_out(out: Path) -> None:
    """`--out` made now; WriteError (one line naming it) when it cannot be made or written into, rather
    than the same failure for every input."""
    from ips.errors import WriteError, os_error_line

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"--out: {os_error_line(e, out)}") from None
    if not os.access(out, os.W_OK | os.X_OK):  # EROFS and missing permission both answer here
        raise WriteError(f"--out: {out}: cannot write into it (read-only or no permission)")


def _processes(args: argparse.Namespace) -> int:
    """Processes sharing this machine's CPUs: `--workers`, or N of `--dask local:N` (1 for a remote
    scheduler: its workers are elsewhere, and `--threads 0` lets each use its own CPUs)."""
    if args.dask:
        from data_prep.dask_run import parse_dask

        address, n = parse_dask(args.dask)
        return n if address is None else 0
    return args.workers
