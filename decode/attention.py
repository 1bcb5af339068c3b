"""Paged decode attention: one layer of B sequences with ragged contexts, read in place from the pool.

Per layer: write the step's k/v into each sequence's next slot, score every block in place against
its owner's query, softmax each sequence over its blocks, and sum the per-block outputs back per
sequence. No Python loop runs over sequences; scratch buffers are reused across layers and steps.

The work reads every K/V byte of the batch once per layer, as small stacked matmuls with G query
rows (G = 3 for SmolLM2) that OpenBLAS runs on the calling thread only, so on big batches the block
range is split over two threads (Workspace.split); see decode/blas.py for why BLAS threads must stop
spinning then. How the small products run follows the OpenBLAS core (decode/blas.py): GEMMs where it
has the unpacked small-matrix kernel, else GEMVs (`gemv`), because the packing GEMM spends most of
its time copying each K/V block for only G rows (see _scores).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from decode.pool import PagedKVPool
from model.transformer import softmax_inplace

GATHER_MAX_BATCH = 2  # up to this many rows the copy is tiny and needs fewer numpy calls
GATHER_RANGE_RATIO = 3  # gather when the block range is this many times the batch's own blocks
# the two-thread split pays off from this many scored tokens per layer (measured, 2 threads, blocks of 64:
# batch 8 x ~200 tokens lost 10 ms/step to it, batch 32 gained 7, batch 64 gained ~25)
SPLIT_MIN_TOKENS = 4096


class Workspace:
    """Grow-only float32 scratch buffers reused across layers and steps (no page faults per step)."""

    def __init__(self, threads: int = 2):
        self._bufs: dict[str, np.ndarray] = {}
        self.threads = threads
        self._helper: ThreadPoolExecutor | None = None

    def split(self, fn: Callable[[int, int], None], n: int, parallel: bool = True) -> None:
        """Run fn(lo, hi) over [0, n) in two halves on two threads (the caller and one helper).

        For the attention's stacked small matmuls: OpenBLAS runs each tiny GEMM on the calling
        thread only, so without this the block-range matmuls (memory-bound, cold KV) use one core.
        numpy releases the GIL inside matmul, so the halves run in parallel.
        """
        if self.threads < 2 or not parallel or n < 2:
            fn(0, n)
            return
        if self._helper is None:
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="decode-attn")
        mid = n // 2
        other = self._helper.submit(fn, mid, n)
        fn(0, mid)
        other.result()

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        n = math.prod(shape)  # not np.prod: ~3 us per call, ~10 calls per layer
        buf = self._bufs.get(name)
        if buf is None or buf.size < n:
            buf = np.empty(max(n, int(1.25 * (0 if buf is None else buf.size))), dtype=np.float32)
            self._bufs[name] = buf
        return buf[:n].reshape(shape)


@dataclass(slots=True)
class BatchInput:
    """Everything one step needs, built on the scheduling thread."""

    token_ids: np.ndarray  # (B,) int64: the token fed to each sequence
    positions: np.ndarray  # (B,) int64: its position = tokens already stored
    tables: np.ndarray  # (B, nb) int64: block tables, padded with block 0 (masked)


class PagedBatchAttention:
    """AttentionCache over the paged pool for one step of one batch.

    In place (the usual path): blocks stay where they are: every block id below `hi` (the batch's highest block + 1; the
    allocator packs blocks in use at the bottom) is scored in place against the query of the row
    that owns it and mixed with its V, as batched matmuls over (Hkv, hi), with the softmax split
    by block (flash attention's rescaling); only the per-block outputs are gathered per sequence
    for the final weighted sum, so the K/V bytes are read once and never copied. Blocks in the
    range that no batch row owns are scored against a zero query and never read back. Gathered
    (tiny batches, or a block range mostly owned by sequences outside the batch): each row's blocks
    are copied into a (Hkv, B, T, Dh) scratch.
    """

    def __init__(self, pool: PagedKVPool, batch: BatchInput, ws: Workspace, head_scale: float, gemv: bool = False):
        """gemv: run the score and output products as matrix-vector products (module docstring)."""
        bs = pool.block_size
        self.pool, self.ws = pool, ws
        b, nb = batch.tables.shape
        pos = batch.positions
        counts = pos // bs + 1  # (B,) blocks holding context incl. the fed token
        real = np.arange(nb)[None, :] < counts[:, None]  # (B, nb)
        self.hi = hi = int(batch.tables[real].max()) + 1
        self.tables = np.where(real, batch.tables, hi)  # (B, nb): padding -> the zero row `hi`
        self.owner = np.full(hi, b, dtype=np.int64)  # (hi,) batch row owning each block; b = none
        self.owner[batch.tables[real]] = np.broadcast_to(np.arange(b)[:, None], (b, nb))[real]
        self.new_blocks = batch.tables[np.arange(b), pos // bs]  # (B,) block of the fed token
        self.new_offs = pos % bs  # (B,)
        tok = (np.arange(nb)[:, None] * bs + np.arange(bs)[None, :])  # (nb, bs) token index
        mask = np.where(tok[None] <= pos[:, None, None], 0.0, -np.inf).astype(np.float32)  # (B, nb, bs)
        self.mask = mask[None, :, :, None, :]  # (1, B, nb, 1, bs)
        self.scale = np.float32(head_scale)
        # few rows, or a range mostly owned by others: copying the batch's own blocks is cheaper
        self.gather = b <= GATHER_MAX_BATCH or GATHER_RANGE_RATIO * b * nb <= hi
        self.own_tables = np.where(real, batch.tables, batch.tables[:, :1])  # pad with own block
        self._block_mask: np.ndarray | None = None  # (1, hi, 1, bs), built by the in-place path
        self._pos = pos
        # one row: its blocks as one slice when they are consecutive (the usual case), no copy
        first = int(batch.tables[0, 0])
        self.single = b == 1 and bool(np.array_equal(batch.tables[0, :counts[0]], np.arange(first, first + counts[0])))
        self.splits = not self.gather and ws.threads > 1 and hi * bs >= SPLIT_MIN_TOKENS  # uses the helper
        self.gemv = gemv

    def attend(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """q: (B, H, Dh), k, v: (B, Hkv, Dh) -> (B, H, Dh)"""
        kl, vl = self.pool.k[layer], self.pool.v[layer]  # (Hkv, n_blocks, bs, Dh)
        if self.single and self.gather:
            return self._single(kl, vl, q, k, v)
        kl[:, self.new_blocks, self.new_offs] = k.transpose(1, 0, 2)  # (Hkv, B, Dh)
        vl[:, self.new_blocks, self.new_offs] = v.transpose(1, 0, 2)
        return self._gathered(kl, vl, q) if self.gather else self._in_place(kl, vl, q)

    def _single(self, kl: np.ndarray, vl: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Batch of one whose blocks are consecutive: attend over a view of the pool (batch 1 is
        bound by Python call overhead; this path makes about half the numpy calls of _gathered)."""
        hkv, _, bs, dh = kl.shape
        blk, off = int(self.new_blocks[0]), int(self.new_offs[0])
        kl[:, blk, off] = k[0]
        vl[:, blk, off] = v[0]
        n = int(self.new_blocks[0]) - int(self.own_tables[0, 0]) + 1  # blocks holding context
        first, t = int(self.own_tables[0, 0]), n * bs
        g = q.shape[1] // hkv
        qh = np.multiply(q[0].reshape(hkv, g, dh), self.scale)  # (Hkv, G, Dh)
        s = np.empty((hkv, g, t), dtype=np.float32)
        _scores(kl[:, first:first + n].reshape(hkv, t, dh), qh, s, self.gemv)  # (Hkv, G, T)
        s += self.mask[0, 0, :n].reshape(1, 1, t)
        softmax_inplace(s)
        ctx = np.empty((hkv, g, dh), dtype=np.float32)
        _mix(s, vl[:, first:first + n].reshape(hkv, t, dh), ctx, self.gemv)
        return ctx.reshape(1, hkv * g, dh)  # (1, H, Dh)

    def _gathered(self, kl: np.ndarray, vl: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Copy each row's blocks into (Hkv, B, T, Dh), then two batched matmuls."""
        hkv, _, bs, dh = kl.shape
        b, nb = self.tables.shape
        t, g, ws = nb * bs, q.shape[1] // hkv, self.ws
        kg = ws.get("kg", (hkv, b, nb, bs, dh))
        vg = ws.get("vg", (hkv, b, nb, bs, dh))
        np.take(kl, self.own_tables, axis=1, out=kg, mode="clip")  # mode=clip: unbuffered
        np.take(vl, self.own_tables, axis=1, out=vg, mode="clip")
        qh = ws.get("qh", (hkv, b, g, dh))
        np.multiply(q.reshape(b, hkv, g, dh).transpose(1, 0, 2, 3), self.scale, out=qh)
        s = ws.get("sg", (hkv, b, g, t))  # (Hkv, B, G, T)
        _scores(kg.reshape(hkv, b, t, dh), qh, s, self.gemv)
        s += self.mask.reshape(1, b, 1, t)
        softmax_inplace(s)
        ctx = ws.get("cg", (hkv, b, g, dh))
        _mix(s, vg.reshape(hkv, b, t, dh), ctx, self.gemv)  # (Hkv, B, G, Dh)
        return ctx.transpose(1, 0, 2, 3).reshape(b, hkv * g, dh)

    def _get_block_mask(self, b: int, nb: int, bs: int) -> np.ndarray:
        """(1, hi, 1, bs): 0 where a block's token is in its owner's context, -inf elsewhere;
        0 throughout blocks no row owns (scored against a zero query, never read back)."""
        if self._block_mask is None:
            real = self.tables < self.hi  # (B, nb)
            slot = np.zeros(self.hi, dtype=np.int64)  # (hi,) index of each owned block in its row's table
            slot[self.tables[real]] = np.broadcast_to(np.arange(nb)[None, :], (b, nb))[real]
            btok = slot[:, None] * bs + np.arange(bs)[None, :]  # (hi, bs) token index in the owner's context
            owner_pos = np.append(self._pos, nb * bs)[self.owner]  # (hi,): past every slot where no row owns
            mask = np.where(btok <= owner_pos[:, None], 0.0, -np.inf).astype(np.float32)
            self._block_mask = mask[None, :, None, :]
        return self._block_mask

    def _in_place(self, kl: np.ndarray, vl: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Score the block range in place, one pass per block on both threads (ws.split), with
        the softmax split by block as in flash attention: each block is exponentiated against its
        own max and mixed with its V; per row, the blocks' outputs are then weighted by
        exp(block max - row max) / the row's sum (small (Hkv, B, nb, G) tiles) and added."""
        hkv, _, bs, dh = kl.shape
        b, nb = self.tables.shape
        hi, g, ws = self.hi, q.shape[1] // hkv, self.ws
        qs = ws.get("qs", (hkv, b + 1, g, dh))  # (Hkv, B+1, G, Dh): scaled queries, row B = zeros
        np.multiply(q.reshape(b, hkv, g, dh).transpose(1, 0, 2, 3), self.scale, out=qs[:, :b])
        qs[:, b] = 0.0
        qb = ws.get("qb", (hkv, hi, g, dh))  # (Hkv, hi, G, Dh): the owner's query for each block
        np.take(qs, self.owner, axis=1, out=qb, mode="clip")  # mode=clip: unbuffered
        s = ws.get("s", (hkv, hi, g, bs))  # (Hkv, hi, G, bs): scores, then exp(score - block max)
        mask = self._get_block_mask(b, nb, bs)  # (1, hi, 1, bs)
        bmax = ws.get("bmax", (hkv, hi + 1, g))  # (Hkv, hi+1, G): per-block max; row hi = padding
        bsum = ws.get("bsum", (hkv, hi + 1, g))  # (Hkv, hi+1, G): per-block sum of exp
        c = ws.get("c", (hkv, hi + 1, g, dh))  # (Hkv, hi+1, G, Dh): per-block unnormalised outputs

        def blocks(lo: int, up: int) -> None:
            sl, ml = s[:, lo:up], bmax[:, lo:up]
            _scores(kl[:, lo:up], qb[:, lo:up], sl, self.gemv)
            sl += mask[:, lo:up]
            np.max(sl, axis=3, out=ml)
            sl -= ml[..., None]
            np.exp(sl, out=sl)
            np.sum(sl, axis=3, out=bsum[:, lo:up])
            _mix(sl, vl[:, lo:up], c[:, lo:up], self.gemv)

        ws.split(blocks, hi, self.splits)
        bmax[:, hi], bsum[:, hi], c[:, hi] = -np.inf, 0.0, 0.0
        weight = np.take(bmax, self.tables, axis=1)  # (Hkv, B, nb, G): block max, padding -inf
        weight -= weight.max(axis=2, keepdims=True)
        np.exp(weight, out=weight)  # exp(block max - row max); padding 0
        total = np.take(bsum, self.tables, axis=1)  # (Hkv, B, nb, G)
        total *= weight
        weight /= total.sum(axis=2, keepdims=True)
        o = ws.get("o", (hkv, b, nb, g, dh))
        np.take(c, self.tables, axis=1, out=o, mode="clip")  # (Hkv, B, nb, G, Dh)
        # (Hkv, B, G, 1, nb) @ (Hkv, B, G, nb, Dh): half the time of o *= weight; o.sum(axis=2)
        ctx = np.matmul(weight.transpose(0, 1, 3, 2)[..., None, :], o.transpose(0, 1, 3, 2, 4))
        return ctx.transpose(1, 0, 2, 3, 4).reshape(b, hkv * g, dh)  # (B, H, Dh), a copy


def _scores(k: np.ndarray, q: np.ndarray, out: np.ndarray, gemv: bool) -> None:
    """k: (..., T, Dh), q: (..., G, Dh) -> out: (..., G, T) = q @ k^T.

    gemv: one matrix-vector product per query row (numpy runs a stacked matmul whose last dim is 1
    as GEMVs, reading k in place). With OpenBLAS's Haswell kernels the GEMM packs k first, ~1.1 us
    per 64x64 block for 3 rows, hot or cold; measured at batch 64, 2 threads, 30 layers, both
    products: GEMM 37 ms, GEMV 27. With SkylakeX's small-matrix kernel, GEMM 21 ms, GEMV 26.
    """
    if gemv:
        np.matmul(k[..., None, :, :], q[..., None], out=out[..., None])  # (..., G, T, 1)
    else:
        np.matmul(q, np.swapaxes(k, -1, -2), out=out)


def _mix(p: np.ndarray, v: np.ndarray, out: np.ndarray, gemv: bool) -> None:
    """p: (..., G, T), v: (..., T, Dh) -> out: (..., G, Dh) = p @ v; gemv as in _scores."""
    if gemv:
        np.matmul(p[..., None, :], v[..., None, :, :], out=out[..., None, :])  # (..., G, 1, Dh)
    else:
        np.matmul(p, v, out=out)
