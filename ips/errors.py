"""One error hierarchy. Every error a user can cause derives from `IpsError` and carries the exit status
the CLI returns for it (docs/ARCHITECTURE.md: 0 all done, 1 some inputs failed, 2 bad usage or config); `ips.cli.main`
maps them in one place. Messages are one line that names the file or key and what is wrong."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

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


class WriteError(IpsError):
    """A file or folder cannot be written (disk full, read-only, no permission, a file where a folder
    must be); the message names it and what happened."""


class PrepError(IpsError):
    """An input cannot be converted; `str(e)` is a one-line reason (the caller adds the file name)."""


def os_error_reason(e: OSError) -> str:
    """What an OSError says happened, e.g. `No space left on device (ENOSPC)`."""
    code = errno.errorcode.get(e.errno or 0)
    text = e.strerror or (os.strerror(e.errno) if e.errno else str(e) or type(e).__name__)
    return f"{text} ({code})" if code else text


def os_error_line(e: OSError, path: object = None) -> str:
    """An OSError as one line naming the file: `PATH: No space left on device (ENOSPC)`.

    `path` is the file the caller was writing or reading, used when the error does not name one."""
    where = e.filename if e.filename is not None else path
    if e.filename2 is not None:
        where = f"{e.filename} -> {e.filename2}"
    reason = os_error_reason(e)
    return f"{where}: {reason}" if where is not None else reason


@dataclass(frozen=True)
class Failure:
    """One input that failed: its name (slide id or path), where it is, and a one-line reason."""

    name: str
    path: str
    reason: str


def remote_reason(e: BaseException) -> str:
    """An object-store client's error (obstore: many lines, XML and a debug dump) as a short reason:
    the service's code and message (`NoSuchBucket: The specified bucket does not exist`), an HTTP status,
    or that the server could not be reached."""
    import re

    text = str(e)
    code = re.search(r"<Code>([^<]+)</Code>", text)
    message = re.search(r"<Message>([^<]+)</Message>", text)
    if code:
        return f"{code.group(1)}: {message.group(1)}" if message else code.group(1)
    if "error sending request" in text or "Connection refused" in text or "dns error" in text:
        retries = re.search(r"after (\d+) retries", text)
        tried = f" after {retries.group(1)} retries" if retries else ""
        return f"cannot reach the server{tried} (check AWS_ENDPOINT_URL and the network)"
    status = re.search(r"status code: (\d{3})[^:]*(?::\s*([^\n<]*))?", text)
    if status:
        hint = {
            "401": "unauthenticated: check the credentials",
            "403": "access denied: check the credentials",
        }
        detail = hint.get(status.group(1), (status.group(2) or "").strip())
        return f"HTTP {status.group(1)}" + (f" ({detail})" if detail else "")
    lines = [x.strip() for x in text.split("Debug source:")[0].splitlines() if x.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def is_remote_error(e: BaseException) -> bool:
    """An error raised by the object-store client (obstore), whatever its kind."""
    return type(e).__module__.split(".")[0] in ("obstore", "_obstore")


def one_line(e: BaseException) -> str:
    """An exception as one line: its message (prefixed with its type for kinds that are not ours)."""
    if is_remote_error(e):
        return f"object store: {remote_reason(e)}"
    if isinstance(e, OSError) and not isinstance(e, IpsError) and e.errno is not None:
        return os_error_line(e)
    text = (str(e).strip().splitlines() or [""])[0]
    return text if isinstance(e, IpsError) else f"{type(e).__name__}: {text}"


def run_each(
    items: Sequence[T],
    work: Callable[[T], R],
    *,
    name: Callable[[T], str] = str,
    path: Callable[[T], str] = str,
    log: Callable[[str], None] | None = None,
    fatal: tuple[type[BaseException], ...] = (),
) -> tuple[list[tuple[T, R]], list[Failure]]:
    """Run `work` on every item; one that raises becomes a `Failure` and the others still run.

    The one loop behind every command that takes several inputs (exit status 1 when some failed).
    `log` gets `[i/n] NAME: FAILED: reason` for each failure as it happens. KeyboardInterrupt and
    other BaseExceptions are not caught: stopping the command stops it; nor are the `fatal` kinds (e.g.
    ConfigError: bad usage that every item would hit).
    Returns (item, result) for the items that succeeded, in order, and the failures, in order.
    """
    done: list[tuple[T, R]] = []
    failures: list[Failure] = []
    for i, item in enumerate(items, 1):
        try:
            done.append((item, work(item)))
        except Exception as e:  # noqa: BLE001 - one bad input must not stop the others
            if isinstance(e, fatal):
                raise
            failures.append(Failure(name(item), path(item), one_line(e)))
            if log:
                log(f"[{i}/{len(items)}] {name(item)}: FAILED: {one_line(e)}")
    return done, failures


def failure_summary(command: str, failures: Sequence[Failure], total: int) -> list[str]:
    """The closing lines of a command with failures: one per failed input, then the count."""
    lines = [f"ips {command}: failed: {f.name} ({f.path}): {f.reason}" for f in failures]
    if failures:
        lines.append(f"ips {command}: {len(failures)} of {total} inputs failed")
    return lines
