"""The vectorised decode core: one step for B sequences with ragged contexts over the paged pool.

The step is model/transformer.py's decode_step, feature-major: activations are (D, B) and every
projection is W @ h over (out, in) copies of the weights (decode/projection.py; ~0.43 GB of RAM per
worker for SmolLM2-135M, whose tied lm_head is the embedding table itself). OpenBLAS splits that GEMM
better over its threads than h @ W (30 layers at batch 64, 2 threads: 73-75 vs 86-96 ms), and small
batches take row blocks or vector blocks instead of the packing sgemm (decode/projection.py). RoPE
cos/sin are gathered once per step and applied to q and k together; norms, SiLU and residual adds
run in place in preallocated buffers. Attention is decode/attention.py. Elementwise math is the
reference's, op for op; GEMM and reduction sums run in another order (~1e-6 relative), which the
exactness tests' near-tie rule covers.

A step can carry a chunk of a prompt being prefilled on this worker (`ChunkInput`: chunked local
prefill, Sarathi-style): its tokens are extra columns of every projection, so the weights are read
once for both; its attention is the prompt's causal attention over the chunks before it
(Transformer.causal_attention), and it gets logits only for its last position, on its last chunk.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import numpy as np

from decode import blas
from decode.attention import BatchInput, PagedBatchAttention, Workspace
from decode.pool import PagedKVPool
from decode.projection import Projection, Split, contiguous_projections
from kvtransfer.layout import KVLayout
from model.sampling import SamplingParams, sample_batch
from model.transformer import Transformer

# Largest batch whose projections take a small-batch path (decode/projection.py), by path and thread
# count. Row blocks (small-matrix kernel), whole steps, context 160, earlier machine, plain -> row
# blocks: 1 thread B=2 98 -> 49 ms, B=8 118 -> 83, B=16 143 -> 119, B=32 187 -> 165, B=48 and 64 no
# gain; 2 threads B=2 61 -> 42, B=4 67 -> 53, B=8 73 -> 66, B=12 equal, B=16 89 -> 95 (worse).
# Vector blocks (Haswell core), same measurement, Zen 5, 2026-12-01: 1 thread B=2 59 -> 26, B=4 64 -> 38,
# B=6 79 -> 48, B=8 71 -> 59, B=10 84 -> 71, B=12 89 -> 86, B=16 94 -> 106 (worse); 2 threads B=2 36 -> 26,
# B=4 42 -> 32, B=6 50 -> 39, B=8 44 -> 47 (worse).
SMALL_MAX_BATCH = {("rows", 1): 32, ("rows", 2): 8, ("vectors", 1): 10, ("vectors", 2): 6}


@dataclass(frozen=True, slots=True)
class LayerProjections:
    qkv: Projection  # (H + 2Hkv) * Dh x D
    wo: Projection  # D x H * Dh
    gate_up: Projection  # 2F x D
    down: Projection  # D x F


_projections: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(slots=True)
class ChunkInput:
    """A chunk of a prompt riding a step: its tokens at positions start.., after the K/V of the prompt's
    tokens before it (per layer (start, Hkv, Dh); empty lists: start = 0). The step fills the rest."""

    token_ids: np.ndarray  # (c,)
    start: int
    past_ks: list[np.ndarray] = field(default_factory=list)
    past_vs: list[np.ndarray] = field(default_factory=list)
    last: bool = False  # the prompt's last chunk: logits for its last position
    ks: list[np.ndarray] = field(default_factory=list)  # out: per layer the chunk's own K/V, (c, Hkv, Dh)
    vs: list[np.ndarray] = field(default_factory=list)
    logits: np.ndarray | None = None  # out, when last: (V,)


def model_projections(model: Transformer) -> tuple[list[LayerProjections], Projection]:
    """(per-layer projections, lm_head (V x D)) of a model, built once per model and process: every
    DecodeCore of the model shares the read-only (out, in) copies."""
    got = _projections.get(model)
    if got is None:
        w = model.weights
        order = [m for lw in w.layers for m in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down)]
        if not model.cfg.tied_embeddings:
            order.append(w.lm_head)
        flat = contiguous_projections(order)  # in the step's order of use
        layers = [LayerProjections(*flat[i:i + 4]) for i in range(0, 4 * len(w.layers), 4)]
        # tied: the embedding table is already lm_head's (V, D) form; a copy would cost 113 MB here
        lm_head = Projection(w.token_embedding) if model.cfg.tied_embeddings else flat[-1]
        got = _projections[model] = (layers, lm_head)
    return got


class DecodeCore:
    """Runs decode steps of the model against the paged pool."""

    def __init__(self, model: Transformer, pool: PagedKVPool, threads: int | None = None,
                 small_max_batch: int | None = None, vectors: bool | None = None):
        """threads: cores the step may use (BLAS threads and the helper thread); None = numpy's
        current BLAS thread count. small_max_batch: the largest batch whose projections take the
        small-batch path (decode/projection.py: row blocks with OpenBLAS's small-matrix kernel, else
        vector blocks); None = measured default for the path and thread count, 0 = never. vectors:
        run small products as matrix-vector products (vector blocks rather than row blocks, GEMV
        attention: decode/attention.py); None = when numpy's OpenBLAS core lacks the small-matrix
        kernel."""
        problem = pool.layout.mismatch(model_layout(model))
        if problem is not None:
            raise ValueError(f"pool.layout: {problem}")
        self.model, self.pool = model, pool
        self.threads = blas.blas_threads() if threads is None else threads
        self.ws = Workspace(min(2, self.threads))
        self._scale = 1.0 / float(np.sqrt(model.cfg.head_dim))
        self.vectors = not blas.small_matrix_kernel() if vectors is None else vectors
        if small_max_batch is None:
            path = "vectors" if self.vectors else "rows"
            small_max_batch = SMALL_MAX_BATCH[path, min(2, self.threads)] if blas.is_openblas() else 0
        self.small_max_batch = small_max_batch
        self.layers, self.lm_head = model_projections(model)

    def batch_input(self, request_ids: list[str], token_ids: list[int], positions: list[int]) -> BatchInput:
        """Block tables padded to the longest context (+1 for the fed token) of the batch."""
        alloc = self.pool.allocator
        pos = np.asarray(positions, dtype=np.int64)
        nb = alloc.blocks_for(int(pos.max()) + 1)
        tables = np.zeros((len(request_ids), nb), dtype=np.int64)  # (B, nb)
        for row, rid in enumerate(request_ids):  # bookkeeping only: B short list copies
            table = alloc.block_table(rid)[:nb]
            tables[row, :len(table)] = table
        assert all(len(alloc.block_table(r)) * alloc.block_size > p for r, p in zip(request_ids, positions))
        return BatchInput(np.asarray(token_ids, dtype=np.int64), pos, tables)

    def forward(self, batch: BatchInput, chunk: ChunkInput | None = None) -> np.ndarray:
        """One step: store each fed token's KV, return logits (B, V); `chunk` rides it (module docstring)."""
        cache = PagedBatchAttention(self.pool, batch, self.ws, self._scale, gemv=self.vectors)
        cols = len(batch.token_ids) + (0 if chunk is None else len(chunk.token_ids))
        split = self.ws.split if 2 <= cols <= self.small_max_batch else None
        if self.threads < 2:
            return self._forward(batch, cache, split, chunk)
        # see decode/blas.py: idle BLAS threads must not spin over the helper thread's work
        blas.set_spin(blas.SHORT_TIMEOUT_LOG2 if cache.splits or split else blas.DEFAULT_TIMEOUT_LOG2)
        if split is None:
            return self._forward(batch, cache, split, chunk)
        blas.set_threads(1)  # row blocks: the caller and the helper thread run the single-threaded kernel
        try:
            return self._forward(batch, cache, split, chunk)
        finally:
            blas.set_threads(self.threads)

    def _forward(self, batch: BatchInput, cache: PagedBatchAttention, split: Split | None,
                 chunk: ChunkInput | None = None) -> np.ndarray:
        """The step; split: run projections as small-kernel row blocks (decode/projection.py). The
        chunk's n tokens are columns B.. of every activation (B + n columns)."""
        m, c, ws = self.model, self.model.cfg, self.ws
        b0, dh, hq, hkv = len(batch.token_ids), c.head_dim, c.n_heads, c.n_kv_heads
        half, f, eps = dh // 2, c.d_ff, np.float32(c.rms_eps)
        ids, positions = batch.token_ids, batch.positions
        if chunk is not None:
            n = len(chunk.token_ids)
            ids = np.concatenate([ids, chunk.token_ids])
            positions = np.concatenate([positions, np.arange(chunk.start, chunk.start + n)])
            chunk.ks, chunk.vs = [], []
        b = len(ids)  # columns: the batch's tokens, then the chunk's
        cos, sin = m.rope.cos[positions].T, m.rope.sin[positions].T  # (Dh/2, B)
        cos2 = np.concatenate([cos, cos])[None]  # (1, Dh, B)
        sin2 = np.concatenate([-sin, sin])[None]  # rotate-half signs folded in
        n_qk = hq + hkv
        h = np.ascontiguousarray(m.weights.token_embedding[ids].T, dtype=np.float32)  # (D, B)
        hn = ws.get("hn", h.shape)  # (D, B) normed
        ms = ws.get("ms", (b,))
        qkv = ws.get("qkv", (n_qk + hkv, dh, b))  # (H + 2Hkv, Dh, B)
        rot = ws.get("rot", (n_qk, dh, b))  # (H + Hkv, Dh, B) q and k heads, rotated
        sw = ws.get("sw", (n_qk, dh, b))
        proj = ws.get("proj", h.shape)  # (D, B) output of wo / w_down
        gu = ws.get("gu", (2 * f, b))  # (2F, B)
        act = ws.get("act", (f, b))  # (F, B)
        for layer, (w, p) in enumerate(zip(m.weights.layers, self.layers)):
            _rms_norm_fm(h, w.attn_norm, eps, hn, ms)
            p.qkv.apply(hn, qkv.reshape(-1, b), split, self.vectors)
            qk = qkv[:n_qk]
            np.multiply(qk, cos2, out=rot)  # [x1 c - x2 s, x2 c + x1 s], bitwise as the reference
            np.multiply(qk[:, half:], sin2[:, :half], out=sw[:, :half])
            np.multiply(qk[:, :half], sin2[:, half:], out=sw[:, half:])
            rot += sw
            attn = cache.attend(layer, rot[:hq, :, :b0].transpose(2, 0, 1), rot[hq:, :, :b0].transpose(2, 0, 1),
                                qkv[n_qk:, :, :b0].transpose(2, 0, 1)).reshape(b0, -1)  # (B0, H*Dh)
            if chunk is not None:
                attn = np.concatenate([attn, self._chunk_attention(chunk, layer, rot, qkv, b0, hq, n_qk)])
            p.wo.apply(attn.T, proj, split, self.vectors)
            h += proj
            _rms_norm_fm(h, w.ffn_norm, eps, hn, ms)
            p.gate_up.apply(hn, gu, split, self.vectors)
            gate, up = gu[:f], gu[f:]
            np.negative(gate, out=act)  # silu(gate) * up, the reference's op order
            np.exp(act, out=act)
            act += 1.0
            np.divide(gate, act, out=act)
            act *= up
            p.down.apply(act, proj, split, self.vectors)
            h += proj
        _rms_norm_fm(h, m.weights.final_norm, eps, hn, ms)
        if chunk is not None:  # logits for the batch, and for the chunk's last position on its last chunk
            rows = np.concatenate([hn[:, :b0], hn[:, -1:]], axis=1) if chunk.last else hn[:, :b0]
            logits = rows.T @ self.lm_head.w.T  # (B0 (+1), V)
            chunk.logits = logits[b0] if chunk.last else None
            return logits[:b0]
        if split is None:
            return hn.T @ self.lm_head.w.T  # (B, V)
        return np.ascontiguousarray(self.lm_head.apply(hn, ws.get("logits", (c.vocab_size, b)), split, self.vectors).T)

    def _chunk_attention(self, chunk: ChunkInput, layer: int, rot: np.ndarray, qkv: np.ndarray, b0: int, hq: int,
                         n_qk: int) -> np.ndarray:
        """The chunk's columns of rot / qkv: keep its K/V, attend over the prompt so far -> (n, H*Dh)."""
        q = rot[:hq, :, b0:].transpose(2, 0, 1)  # (n, H, Dh)
        k = np.ascontiguousarray(rot[hq:, :, b0:].transpose(2, 0, 1))  # (n, Hkv, Dh)
        v = np.ascontiguousarray(qkv[n_qk:, :, b0:].transpose(2, 0, 1))
        chunk.ks.append(k)
        chunk.vs.append(v)
        if chunk.past_ks:
            k, v = np.concatenate([chunk.past_ks[layer], k]), np.concatenate([chunk.past_vs[layer], v])
        return self.model.causal_attention(q, k, v, chunk.start)

    @staticmethod
    def sample(logits: np.ndarray, params: list[SamplingParams], rngs: list[np.random.Generator]) -> np.ndarray:
        """logits (B, V) -> token ids (B,): greedy rows in one argmax, others seeded per request."""
        return sample_batch(logits, params, rngs)

    def recompute(self, request_id: str, token_ids: list[int]) -> None:
        """Rebuild a preempted sequence's KV for token_ids (its blocks are already allocated)."""
        _, ks, vs = self.model.prefill(token_ids)
        for layer, (k, v) in enumerate(zip(ks, vs)):
            self.pool.store(request_id, layer, 0, k, v)


def _rms_norm_fm(h: np.ndarray, weight: np.ndarray, eps: np.float32, out: np.ndarray, ms: np.ndarray) -> np.ndarray:
    """Feature-major model.transformer.rms_norm: h (D, B) -> out (D, B), same elementwise op order.

    Plain ufuncs into preallocated buffers (einsum's call overhead was ~3% of a batch-1 step).
    ms: (B,) scratch.
    """
    np.multiply(h, h, out=out)
    np.add.reduce(out, axis=0, out=ms)  # (B,) sum of squares
    ms /= np.float32(h.shape[0])
    ms += eps
    np.sqrt(ms, out=ms)
    np.divide(1.0, ms, out=ms)  # float32 throughout, as the reference
    np.multiply(h, ms, out=out)
    out *= weight[:, None]
    return out


def model_layout(model: Transformer) -> KVLayout:
    """The KVLayout a pool for this model must have."""
    c = model.cfg
    return KVLayout(c.n_layers, c.n_kv_heads, c.head_dim, "float32")
