"""Keep large buffers in the malloc heap: glibc's defaults page-fault every KV frame.

gRPC Python hands each received message to us as a fresh `bytes`, and the sender builds each frame
as one; at 256 KB - 1 MB a frame, glibc serves them with mmap or trims them back to the kernel as soon
as they are freed, so every frame's pages are faulted in (and zeroed) again. Measured with
`python -m bench.kvtransfer` on the 2-core machine: the receiver's CPU per GB fell from ~0.6 to ~0.35
s for the real transfer and ~0.3-0.5 to ~0.2 s for bare gRPC once the process kept freed frames for
reuse. `keep_large_buffers()` sets the two mallopt knobs that do that (the same as starting the
process with MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_). It is process-wide; the KV server and
sender call it, so the decode and prefill workers get it. Elsewhere than glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum on 64-bit: allocations below this come from the heap
TRIM_THRESHOLD = 64 * 1024 * 1024  # free heap kept per malloc arena before it goes back to the kernel:
# a window of 1 MB frames (SenderConfig.window = 32) with room to spare; per arena, so a process with
# many threads may keep several times this (glibc makes up to 8 arenas per core)

_lock = threading.Lock()
_done: bool | None = None


def keep_large_buffers() -> bool:
    """Tune glibc malloc once per process; True when it took effect (glibc), False otherwise."""
    global _done
    with _lock:
        if _done is None:
            _done = _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and _mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        return _done


def _mallopt(param: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator alone
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(param, value) == 1
