"""One error hierarchy. Every error a user can cause derives from `IpsError` and carries the exit status
the CLI returns for it (DESIGN.md: 0 all done, 1 some inputs failed, 2 bad usage or config); `ips.cli.main`
maps them in one place. Messages are one line that names the file or key and what is wrong."""

from __future__ import annotations

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


class IpsError(Exception):
    """Base of every user-facing error; `label` prefixes the CLI's message ('' for none)."""

    exit_code: int = EXIT_SOME_FAILED
    label: str = ""


class ConfigError(IpsError, ValueError):
    """A config key or value is wrong; the message names the key."""

    exit_code = EXIT_USAGE
    label = "config error"


class ManifestError(IpsError, ValueError):
    """A manifest problem; the message names the file, row and column."""

    exit_code = EXIT_USAGE


class StoreError(IpsError, ValueError):
    """A store is missing, incomplete, damaged, or lacks the grid / feature set asked for."""

    exit_code = EXIT_USAGE


class CheckpointError(IpsError, ValueError):
    """A checkpoint file is missing, not a checkpoint, or damaged; the message names the file."""

    exit_code = EXIT_USAGE
    label = "checkpoint error"


class BudgetError(IpsError, RuntimeError):
    """Even one slide does not fit the memory budget; the message says what to lower."""

    exit_code = EXIT_USAGE


class RunDirError(IpsError, RuntimeError):
    """A run directory is in use by another run, or holds a different run; the message names it."""

    exit_code = EXIT_USAGE


class PrepError(IpsError):
    """An input cannot be converted; `str(e)` is a one-line reason (the caller adds the file name)."""
