"""OpenBLAS thread control for the decode step: thread count, and how long idle BLAS threads spin.

After every threaded call OpenBLAS's worker threads busy-wait for the next one (2^28 cycles,
~0.1 s, by default). Between two GEMMs of a layer that is what we want (no wake-up latency), but
during the paged attention (small matmuls on the caller and the attention helper thread) the
spinning thread takes the second core from the helper: measured at batch 64, 2 threads, the
helper split of attention gained nothing with the default spin and ~20 ms/step with a short one.
A short spin costs batch 1 (matrix-vector products back to back) ~2-4 ms/step, so the decode core
switches per step: short while a step uses the attention helper, the default otherwise.

The switch sets OPENBLAS_THREAD_TIMEOUT, re-reads the environment and restarts the thread pool
(OpenBLAS re-creates it on the next threaded call). It must not race another BLAS call in the
process: the decode worker runs every BLAS call of a step on its one step thread.
No-op (returns False) when numpy's BLAS is not OpenBLAS or lacks the entry points.
"""
from __future__ import annotations

import ctypes
import os

import numpy as np  # noqa: F401  (loads numpy's BLAS before the controllers look for it)
from threadpoolctl import ThreadpoolController

DEFAULT_TIMEOUT_LOG2 = 28  # OpenBLAS's built-in THREAD_TIMEOUT (cycles, log2)
SHORT_TIMEOUT_LOG2 = 17  # ~50 us: spans the gaps between one layer's GEMMs, not its attention

_lib: ctypes.CDLL | None = None
_checked = False
_current: int | None = None
_controllers: list | None = None


def _openblas_controllers() -> list:
    """threadpoolctl's controllers of the loaded OpenBLAS libraries ([] with another BLAS), found once."""
    global _controllers
    if _controllers is None:
        _controllers = ThreadpoolController().select(internal_api="openblas").lib_controllers
    return _controllers


def _openblas() -> ctypes.CDLL | None:
    global _lib, _checked
    if not _checked:
        _checked = True
        for c in _openblas_controllers():
            lib = ctypes.CDLL(c.filepath)
            if hasattr(lib, "openblas_read_env") and hasattr(lib, "blas_thread_shutdown_"):
                _lib = lib
                break
    return _lib


def blas_threads() -> int:
    """The BLAS thread count numpy uses now (1 when unknown)."""
    info = ThreadpoolController().select(user_api="blas").info()
    return max([int(i["num_threads"]) for i in info] or [1])


def set_spin(log2_cycles: int) -> bool:
    """Let idle OpenBLAS threads spin 2^log2_cycles cycles (4..30) before sleeping."""
    global _current
    if _current == log2_cycles:
        return True
    lib = _openblas()
    if lib is None:
        return False
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(log2_cycles)
    lib.openblas_read_env()
    lib.blas_thread_shutdown_()  # threads restart with the new timeout on the next threaded call
    _current = log2_cycles
    return True


def set_threads(n: int) -> None:
    """Set OpenBLAS's thread count for the process (no-op with another BLAS). Process-wide, like
    set_spin: the decode core sets 1 for a row-block step and restores its count after it."""
    for c in _openblas_controllers():
        c.set_num_threads(n)


def is_openblas() -> bool:
    """Whether numpy's BLAS is OpenBLAS (decode/projection.py's small-batch paths rely on its threads)."""
    return bool(_openblas_controllers())


SMALL_MATRIX_CORES = {"skylakex", "cooperlake", "sapphirerapids"}  # x86-64 cores with the small-matrix GEMM


def _cores() -> list[str]:
    return [str(c.architecture) for c in _openblas_controllers()]


def openblas_core() -> str:
    """The OpenBLAS core numpy runs (e.g. "Haswell", "SkylakeX"), or "" with another BLAS."""
    return ",".join(_cores())


def small_matrix_kernel() -> bool:
    """Whether numpy's OpenBLAS runs a core with the unpacked small-matrix GEMM kernel; the core
    is what OpenBLAS detected or what OPENBLAS_CORETYPE forces (Haswell here)."""
    return any(core.lower() in SMALL_MATRIX_CORES for core in _cores())
