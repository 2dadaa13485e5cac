"""The C heap of a prep process: large blocks go back to the system when freed.

glibc's malloc serves a block of 128 KiB or more by its own mmap, returned to the system on free, but
after the first such block is freed it raises that threshold to the block's size (up to 32 MiB): later
blocks of up to that size come from the heap, where freed pieces between live ones stay resident. Prep
allocates and frees blocks of every size from a few hundred KiB to a shard (tiles, chunks, levels), so
its resident size crept up with the number of blocks, i.e. with the slide. A fixed threshold stops it.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h); setting it turns the dynamic threshold off
THRESHOLD = 256 << 10


def return_large_blocks(threshold: int = THRESHOLD) -> bool:
    """Serve every allocation of `threshold` bytes or more by mmap, for good (process-wide). Returns
    whether the C library took it (glibc on Linux; elsewhere nothing is changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
