"""`ips verify STORE...`: check that stores are complete and intact: the marker, each array's and grid's
metadata, every recorded chunk's size and crc32c, no links and no files the marker does not record.

One line per store: `ok STORE` on stdout, or `ips verify: DAMAGED <first problem>` on stderr (with the
count of further problems); any failure of one store is reported and the next store is checked. Exit
status: 0 all intact, 1 some missing, incomplete, damaged or unverifiable (format 1), 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys

from ips.errors import EXIT_OK, EXIT_SOME_FAILED, StoreError, run_each


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check stores: marker, metadata, every recorded chunk's size and crc32c",
        description="Check each STORE made by `ips prep`: complete, its marker intact, every array's and "
        "grid's metadata as recorded, every written chunk/shard present with its recorded size and "
        "crc32c, no links. One line per store. Exit 0 all intact, 1 some damaged (each named), 2 bad usage.",
    )
    p.add_argument("stores", nargs="+", metavar="STORE", help="store paths (DIR/<slide_id>.zarr)")
    p.set_defaults(func=run)


def verify_one(store: str) -> list[str]:
    """Every problem of one store, one line each (empty: intact); never raises for a damaged store."""
    from ips.format.store import verify_store

    return verify_store(store)


def summary(problems: list[str]) -> str:
    """The one line of a damaged store: its first problem, and how many more there are."""
    more = len(problems) - 1
    return problems[0] + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def run(args: argparse.Namespace) -> int:
    def check(store: str) -> None:
        problems = verify_one(store)
        if problems:
            raise StoreError(summary(problems))
        print(f"ok {store}")

    def damaged(line: str) -> None:  # as each store is checked: `[i/n] STORE: FAILED: reason`
        print(f"ips verify: DAMAGED {line.split(': FAILED: ', 1)[1]}", file=sys.stderr)

    _, failures = run_each(args.stores, check, log=damaged)
    if failures:
        print(
            f"ips verify: {len(failures)} of {len(args.stores)} stores damaged or unverifiable",
            file=sys.stderr,
        )
    return EXIT_SOME_FAILED if failures else EXIT_OK
