"""`data_prep.heap.return_large_blocks`: freed blocks of 1 MiB go back to the system, where glibc's
dynamic threshold (raised by an earlier freed 16 MiB block) would keep them in the heap."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import sys
import numpy as np
from data_prep.heap import return_large_blocks

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

if sys.argv[1] == "fixed":
    assert return_large_blocks()
big = np.ones(16 << 20, np.uint8)
del big  # glibc raises its mmap threshold to 16 MiB here, unless it is fixed
blocks = [np.ones(1 << 20, np.uint8) for _ in range(64)]
before = resident()
del blocks[::2]  # every other block: heap pieces between live ones cannot be trimmed
print((before - resident()) >> 20)
"""


def _released(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="not glibc: nothing to fix")
def test_freed_megabyte_blocks_leave_the_process():
    assert _released("fixed") >= 30  # 32 blocks of 1 MiB freed: all of them returned
    assert _released("dynamic") <= 4  # the control: glibc's own behaviour keeps them
