"""`ips verify STORE...`: check that stores are complete and intact (every checksum recorded by `ips prep`).

One line per problem on stderr (store, array, chunk key, what is wrong), `ok STORE` on stdout for each
intact store. Exit status: 0 all intact, 1 some missing, incomplete, damaged or unverifiable (format 1),
2 bad usage.
"""

from __future__ import annotations

import argparse
import sys

from ips.errors import EXIT_OK, EXIT_SOME_FAILED


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check stores: every recorded chunk exists with its size and crc32c",
        description="Check each STORE made by `ips prep`: complete, every written chunk/shard present with "
        "its recorded size and crc32c. Exit 0 all intact, 1 some damaged (each named), 2 bad usage.",
    )
    p.add_argument("stores", nargs="+", metavar="STORE", help="store paths (DIR/<slide_id>.zarr)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ips.data.store import verify_store

    bad = 0
    for store in args.stores:
        problems = verify_store(store)
        for line in problems:
            print(f"ips verify: DAMAGED {line}", file=sys.stderr)
        if problems:
            bad += 1
        else:
            print(f"ok {store}")
    if bad:
        print(f"ips verify: {bad} of {len(args.stores)} stores damaged or unverifiable", file=sys.stderr)
    return EXIT_SOME_FAILED if bad else EXIT_OK
