"""The `ips` command line: argument parsing only; the work is done by the library packages."""

from ips.cli.main import main

__all__ = ["main"]
