"""Paged decode attention: one layer of B sequences with ragged contexts, read in place from the pool.

Per layer: write the step's k/v into each sequence's next slot, score every block in place against
its owner's query, softmax each sequence over its blocks, and sum the per-block outputs back per
sequence. No Python loop runs over sequences; scratch buffers are reused across layers and steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from decode.pool import PagedKVPool
from model.transformer import softmax_inplace

GATHER_MAX_BATCH = 2  # up to this many rows the copy is tiny and needs fewer numpy calls
GATHER_RANGE_RATIO = 3  # gather when the block range is this many times the batch's own blocks


class Workspace:
    """Grow-only float32 scratch buffers reused across layers and steps (no page faults per step)."""

    def __init__(self):
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape))
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
    that owns it, as one batched matmul over (Hkv, hi). Only the small score and output tiles are
    gathered per sequence (for the softmax over its whole context and the final sum), so the K/V
    bytes are read once and never copied. Blocks in the range that no batch row owns are scored
    against a zero query and never read back. Gathered (tiny batches, or a block range mostly owned
    by sequences outside the batch): each row's blocks are copied into a (Hkv, B, T, Dh) scratch.
    """

    def __init__(self, pool: PagedKVPool, batch: BatchInput, ws: Workspace, head_scale: float):
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
        self._zeroed = False
        # few rows, or a range mostly owned by others: copying the batch's own blocks is cheaper
        self.gather = b <= GATHER_MAX_BATCH or GATHER_RANGE_RATIO * b * nb <= hi
        self.own_tables = np.where(real, batch.tables, batch.tables[:, :1])  # pad with own block

    def attend(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """q: (B, H, Dh), k, v: (B, Hkv, Dh) -> (B, H, Dh)"""
        kl, vl = self.pool.k[layer], self.pool.v[layer]  # (Hkv, n_blocks, bs, Dh)
        kl[:, self.new_blocks, self.new_offs] = k.transpose(1, 0, 2)  # (Hkv, B, Dh)
        vl[:, self.new_blocks, self.new_offs] = v.transpose(1, 0, 2)
        return self._gathered(kl, vl, q) if self.gather else self._in_place(kl, vl, q)

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
        s = ws.get("sg", (hkv, b, g, t))
        np.matmul(qh, kg.reshape(hkv, b, t, dh).transpose(0, 1, 3, 2), out=s)  # (Hkv, B, G, T)
        s += self.mask.reshape(1, b, 1, t)
        softmax_inplace(s)
        ctx = ws.get("cg", (hkv, b, g, dh))
        np.matmul(s, vg.reshape(hkv, b, t, dh), out=ctx)  # (Hkv, B, G, Dh)
        return ctx.transpose(1, 0, 2, 3).reshape(b, hkv * g, dh)

    def _in_place(self, kl: np.ndarray, vl: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Score the block range in place; gather only score and output tiles per row."""

        hkv, _, bs, dh = kl.shape
        b, nb = self.tables.shape
        hi, g, ws = self.hi, q.shape[1] // hkv, self.ws
        qs = ws.get("qs", (hkv, b + 1, g, dh))  # (Hkv, B+1, G, Dh): scaled queries, row B = zeros
        np.multiply(q.reshape(b, hkv, g, dh).transpose(1, 0, 2, 3), self.scale, out=qs[:, :b])
        qs[:, b] = 0.0
        qb = ws.get("qb", (hkv, hi, g, dh))  # (Hkv, hi, G, Dh): the owner's query for each block
        np.take(qs, self.owner, axis=1, out=qb, mode="clip")  # mode=clip: unbuffered
        s = ws.get("s", (hkv, hi, g, bs))
        np.matmul(qb, kl[:, :hi].transpose(0, 1, 3, 2), out=s)  # (Hkv, hi, G, bs)
        ss = ws.get("ss", (hkv, b, nb, g, bs))  # (Hkv, B, nb, G, bs): each row's scores in token order
        np.take(s, self.tables, axis=1, out=ss, mode="clip")  # padding clips to a real block: masked
        ss += self.mask
        ss -= ss.max(axis=(2, 4), keepdims=True)
        np.exp(ss, out=ss)
        ss /= ss.sum(axis=(2, 4), keepdims=True)
        p = ws.get("pp", (hkv, hi + 1, g, bs))  # (Hkv, hi+1, G, bs): probabilities back in block order
        if not self._zeroed:  # blocks no row owns keep 0 (never garbage) for the whole step
            p.fill(0.0)
            self._zeroed = True
        p[:, self.tables] = ss
        c = ws.get("c", (hkv, hi + 1, g, dh))  # (Hkv, hi+1, G, Dh): per-block partial outputs
        np.matmul(p[:, :hi], vl[:, :hi], out=c[:, :hi])
        c[:, hi] = 0.0
        o = ws.get("o", (hkv, b, nb, g, dh))
        np.take(c, self.tables, axis=1, out=o, mode="clip")  # (Hkv, B, nb, G, Dh)
        ctx = o.sum(axis=2)  # (Hkv, B, G, Dh)
        return ctx.transpose(1, 0, 2, 3).reshape(b, hkv * g, dh)  # (B, H, Dh), a copy
