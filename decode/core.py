"""The vectorised decode core: one step for B sequences with ragged contexts over the paged pool.

The step is model/transformer.py's decode_step with the per-step work hoisted out of the layer
loop: RoPE cos/sin gathered once per step and applied to q and k together in four ops, residual
adds in place. Projections, MLP and lm_head are one GEMM each over the batch; attention is
decode/attention.py. Same float32 math as the reference, in the same order within each op.
"""
from __future__ import annotations

import numpy as np

from decode.attention import BatchInput, PagedBatchAttention, Workspace
from decode.pool import PagedKVPool
from kvtransfer.layout import KVLayout
from model.sampling import SamplingParams, sample_batch
from model.transformer import Transformer, rms_norm, silu_mul


class DecodeCore:
    """Runs decode steps of the model against the paged pool."""

    def __init__(self, model: Transformer, pool: PagedKVPool):
        problem = pool.layout.mismatch(model_layout(model))
        if problem is not None:
            raise ValueError(f"pool.layout: {problem}")
        self.model, self.pool = model, pool
        self.ws = Workspace()
        self._scale = 1.0 / float(np.sqrt(model.cfg.head_dim))

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

    def forward(self, batch: BatchInput) -> np.ndarray:
        """One step: store each fed token's KV, return logits (B, V)."""
        m, c = self.model, self.model.cfg
        cache = PagedBatchAttention(self.pool, batch, self.ws, self._scale)
        b, half = len(batch.token_ids), c.head_dim // 2
        cos, sin = m.rope.cos[batch.positions], m.rope.sin[batch.positions]  # (B, Dh/2)
        cos2 = np.concatenate([cos, cos], axis=1)[:, None, :]  # (B, 1, Dh)
        sin2 = np.concatenate([-sin, sin], axis=1)[:, None, :]  # rotate-half signs folded in
        qk_end, n_qk = (c.n_heads + c.n_kv_heads) * c.head_dim, c.n_heads + c.n_kv_heads
        x = m.weights.token_embedding[batch.token_ids].astype(np.float32)  # (B, D)
        for layer, w in enumerate(m.weights.layers):
            qkv = rms_norm(x, w.attn_norm, c.rms_eps) @ w.wqkv  # (B, (H + 2Hkv) * Dh)
            qk = qkv[:, :qk_end].reshape(b, n_qk, c.head_dim)  # q and k heads together
            rot = qk * cos2  # (B, H + Hkv, Dh): [x1 c - x2 s, x2 c + x1 s], bitwise as the reference
            swapped = np.concatenate([qk[..., half:], qk[..., :half]], axis=-1)
            swapped *= sin2
            rot += swapped
            v = qkv[:, qk_end:].reshape(b, c.n_kv_heads, c.head_dim)
            attn = cache.attend(layer, rot[:, :c.n_heads], rot[:, c.n_heads:], v)  # (B, H, Dh)
            x += attn.reshape(b, -1) @ w.wo
            x += silu_mul(rms_norm(x, w.ffn_norm, c.rms_eps) @ w.w_gate_up) @ w.w_down
        return m.logits(x)

    @staticmethod
    def sample(logits: np.ndarray, params: list[SamplingParams], rngs: list[np.random.Generator]) -> np.ndarray:
        """logits (B, V) -> token ids (B,): greedy rows in one argmax, others seeded per request."""
        return sample_batch(logits, params, rngs)

    def recompute(self, request_id: str, token_ids: list[int]) -> None:
        """Rebuild a preempted sequence's KV for token_ids (its blocks are already allocated)."""
        _, ks, vs = self.model.prefill(token_ids)
        for layer, (k, v) in enumerate(zip(ks, vs)):
            self.pool.store(request_id, layer, 0, k, v)


def model_layout(model: Transformer) -> KVLayout:
    """The KVLayout a pool for this model must have."""
    c = model.cfg
    return KVLayout(c.n_layers, c.n_kv_heads, c.head_dim, "float32")
