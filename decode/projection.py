"""The decode step's projection GEMMs (y = W x over the batch), each routed to the OpenBLAS path
that suits the batch size.

OpenBLAS's sgemm packs the whole weight matrix on every call. Decode weights are never reused
within a call, so at small batches that packing is most of the cost. Two ways around it, chosen by
the OpenBLAS core in use (decode/blas.py: small_matrix_kernel):

- row blocks (cores with OpenBLAS's "small matrix" kernel: SkylakeX, Cooperlake, SapphireRapids):
  that kernel takes any GEMM with M*N*K <= 1e6 without packing, single-threaded, so W is cut into
  row blocks under that size. The 30 layers' projections, 2 cores, earlier machine: batch 2 38.8 ->
  27.0 ms, 8 45.4 -> 34.5, 16 49.9 -> 45.7.
- vector blocks (other cores, e.g. Haswell, which this machine's environment pins with
  OPENBLAS_CORETYPE): W is cut into row blocks of ~VECTOR_BLOCK_ROWS rows (~0.6 MB, cache-resident)
  and each block takes the batch's B matrix-vector products back to back, so the weights stream
  from memory once, unpacked. One numpy matmul per projection: (1, B, 1, in) @ (blocks, 1, in, rows)
  runs its B x blocks GEMVs block by block. All 121 projections of SmolLM2-135M, Zen 5, Haswell
  core, 1 thread, 2026-12-01: batch 2 55 -> 22 ms, 4 60 -> 34, 6 71 -> 45; at 8 no gain (whole
  steps, both thread counts: decode/core.py).

Projection.apply takes either path for a batch in [2, small_max_batch] (decode/core.py) and runs
its blocks on two threads when the step has two cores. Batch 1 stays a GEMV, and larger batches
stay on the threaded sgemm. With another BLAS, everything takes the plain path.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

SMALL_KERNEL_MNK = 1_000_000  # OpenBLAS's small-matrix limit (its x86-64 SkylakeX-class kernels)
ROW_ALIGN = 16  # the size limit's rows per block round down to this (the kernel's M step)
VECTOR_BLOCK_ROWS = 256  # rows per vector block: 256 x 576 floats = 0.6 MB, in L2 for the B passes

Split = Callable[[Callable[[int, int], None], int], None]  # run fn(lo, hi) over [0, n), maybe on 2 threads


class Projection:
    """One weight matrix of the decode step, stored (out, in) C-contiguous."""

    def __init__(self, w: np.ndarray):
        """w: (out, in) float32, C-contiguous (contiguous_projections builds these), used as is."""
        assert w.dtype == np.float32 and w.flags.c_contiguous, "Projection needs a C-contiguous float32 (out, in) array"
        self.w = w
        self._blocks: dict[int, list[tuple[int, int]]] = {}
        n_out, n_in = w.shape
        rows = vector_block_rows(n_out)
        self._vector_blocks = w.reshape(n_out // rows, rows, n_in).transpose(0, 2, 1)[:, None]  # (n, 1, in, rows)

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

    def apply(self, x: np.ndarray, out: np.ndarray, split: Split | None = None, vectors: bool = False) -> np.ndarray:
        """x: (in, B) -> out: (out, B), C-contiguous. With `split`, the small-batch path: row blocks
        for the small-matrix kernel, or vector blocks if `vectors`."""
        if split is None:
            return np.matmul(self.w, x, out=out)
        if vectors:
            return self._apply_vector_blocks(x, out, split)
        x = np.ascontiguousarray(x)  # the kernel takes a transposed x too, but slower (wo's input)
        blocks = self.row_blocks(x.shape[1])

        def run(first: int, last: int) -> None:
            for lo, hi in blocks[first:last]:
                np.matmul(self.w[lo:hi], x, out=out[lo:hi])

        split(run, len(blocks))
        return out

    def _apply_vector_blocks(self, x: np.ndarray, out: np.ndarray, split: Split) -> np.ndarray:
        wt = self._vector_blocks  # (n, 1, in, rows)
        n, _, _, rows = wt.shape
        b = x.shape[1]
        xr = np.ascontiguousarray(x.T)[None, :, None, :]  # (1, B, 1, in)
        view = out.reshape(n, rows, b).transpose(0, 2, 1)[:, :, None, :]  # (n, B, 1, rows), a view of out

        def run(first: int, last: int) -> None:  # numpy loops blocks outside, the B GEMVs inside
            np.matmul(xr, wt[first:last], out=view[first:last])

        split(run, n)
        return out


def vector_block_rows(n_out: int, target: int = VECTOR_BLOCK_ROWS) -> int:
    """Rows per vector block: the divisor of n_out nearest `target` that gives an even number of
    blocks (the two threads' halves), else n_out (one block)."""
    even = [d for d in range(1, n_out // 2 + 1) if n_out % d == 0 and (n_out // d) % 2 == 0]
    return min(even, key=lambda d: (abs(d - target), -d)) if even else n_out


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
