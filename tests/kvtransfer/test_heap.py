"""kvtransfer.heap: the allocator tuning the KV server and sender apply to their process."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from kvtransfer import heap

ON_GLIBC = platform.libc_ver()[0] == "glibc"

# Allocates, writes and frees 1 MB buffers as the KV frames do, and prints the page faults that cost.
CHURN = """
import resource, sys
from kvtransfer import heap
if sys.argv[1] == "tuned":
    heap.keep_large_buffers()
src = bytes(1 << 20)
def churn():
    for _ in range(50):
        frames = [bytearray(src) for _ in range(4)]
        del frames
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_large_buffers_takes_effect_on_glibc_and_is_idempotent():
    assert heap.keep_large_buffers() is ON_GLIBC
    assert heap.keep_large_buffers() is ON_GLIBC  # a second call changes nothing and says the same


@pytest.mark.skipif(not ON_GLIBC, reason="mallopt is glibc's")
def test_freed_frames_are_reused_without_page_faults():
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's own defaults
    faults = {mode: int(subprocess.run([sys.executable, "-c", CHURN, mode], cwd=root, env=env, check=True,
                                       capture_output=True, text=True).stdout)
              for mode in ("default", "tuned")}
    assert faults["default"] > 50 * 4 * 128  # glibc's defaults fault most pages of every 1 MB frame again
    assert faults["tuned"] < faults["default"] / 20, faults
