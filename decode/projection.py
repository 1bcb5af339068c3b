"""The decode step's projection GEMMs (y = W x over the batch), each routed to the OpenBLAS path
that suits the batch size.

OpenBLAS's threaded sgemm packs the whole weight matrix on every call. Decode weights are never
reused within a call, so at small batches that packing is most of the cost. Measured here for the
30 layers' projections (2 cores, weights (out, in) in RAM):

| batch | GEMV / threaded sgemm | small-matrix kernel, row blocks on 2 threads |
| ---: | ---: | ---: |
| 1 | 17.9 ms (GEMV) | 30.1 ms |
| 2 | 38.8 ms | 27.0 ms |
| 8 | 45.4 ms | 34.5 ms |
| 16 | 49.9 ms | 45.7 ms |

OpenBLAS's "small matrix" kernel (no packing, single-threaded) takes any GEMM with
M*N*K <= 1e6. For a batch in [2, small_max_batch], Projection cuts W into row blocks under that
size and runs them on two threads when the step has two cores. Batch 1 stays a GEMV, and
larger batches stay on the threaded sgemm. With another BLAS, everything takes the plain path.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

SMALL_KERNEL_MNK = 1_000_000  # OpenBLAS's small-matrix limit (x86-64 SkylakeX/Haswell kernels)
ROW_ALIGN = 16  # the size limit's rows per block round down to this (the kernel's M step)

Split = Callable[[Callable[[int, int], None], int], None]  # run fn(lo, hi) over [0, n), maybe on 2 threads


class Projection:
    """One weight matrix of the decode step, stored (out, in) C-contiguous."""

    def __init__(self, w: np.ndarray):
        """w: (out, in) float32, C-contiguous (contiguous_projections builds these), used as is."""
        assert w.dtype == np.float32 and w.flags.c_contiguous, "Projection needs a C-contiguous float32 (out, in) array"
        self.w = w
        self._blocks: dict[int, list[tuple[int, int]]] = {}

    def row_blocks(self, batch: int) -> list[tuple[int, int]]:
        """[lo, hi) row ranges whose GEMM with a (in, batch) input fits the small-matrix kernel: an
        even number of near-equal blocks, so the two threads get the same work."""
        blocks = self._blocks.get(batch)
        if blocks is None:
            n_out, n_in = self.w.shape
            max_rows = max(ROW_ALIGN, SMALL_KERNEL_MNK // (batch * n_in) // ROW_ALIGN * ROW_ALIGN)
            n = -(-n_out // max_rows)
            n += n % 2
            rows = -(-n_out // n)
            blocks = self._blocks[batch] = [(lo, min(lo + rows, n_out)) for lo in range(0, n_out, rows)]
        return blocks

    def apply(self, x: np.ndarray, out: np.ndarray, split: Split | None = None) -> np.ndarray:
        """x: (in, B) -> out: (out, B), C-contiguous. With `split`, the small-kernel row blocks."""
        if split is None:
            return np.matmul(self.w, x, out=out)
        x = np.ascontiguousarray(x)  # the kernel takes a transposed x too, but slower (wo's input)
        blocks = self.row_blocks(x.shape[1])

        def run(first: int, last: int) -> None:
            for lo, hi in blocks[first:last]:
                np.matmul(self.w[lo:hi], x, out=out[lo:hi])

        split(run, len(blocks))
        return out


def contiguous_projections(weights_in_out: Sequence[np.ndarray]) -> list[Projection]:
    """Projections of weights_in_out (each (in, out)), their copies back to back in one allocation,
    in the given order. A step that walks them in that order streams one run of memory, which numpy
    backs with transparent huge pages (allocations >= 4 MB): batch 1's 121 GEMVs of SmolLM2-135M,
    2 threads, took 21.5 ms as separate arrays and 19.0 ms from the arena (one 538 MB GEMV: 17.4)."""
    arena = np.empty(sum(w.size for w in weights_in_out), dtype=np.float32)
    projections, offset = [], 0
    for w in weights_in_out:
        n_in, n_out = w.shape
        copy = arena[offset:offset + w.size].reshape(n_out, n_in)  # (out, in)
        copy[...] = w.T
        projections.append(Projection(copy))
        offset += w.size
    return projections
