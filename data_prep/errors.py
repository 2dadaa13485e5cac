"""The one exception type of `ips prep`: a reason a single input could not be converted."""

from __future__ import annotations


class PrepError(Exception):
    """An input cannot be converted; `str(e)` is a one-line reason (the caller adds the file name)."""
