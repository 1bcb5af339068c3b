"""A float32 numpy Llama transformer: `prefill` one prompt, `decode_step` a batch of sequences.

Attention over past tokens is delegated to a KV cache object (`AttentionCache`), so the same
layer code runs against the dense cache below (reference and in-process generation) and the
paged KV pool of the decode worker.
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from model.config import ModelConfig
from model.gguf_loader import ModelWeights

LayerKVCallback = Callable[[int, np.ndarray, np.ndarray], None]

PREFILL_QUERY_CHUNK = 512  # query rows per attention block in prefill; bounds the score matrix


class AttentionCache(Protocol):
    """Per-sequence KV storage that also computes decode attention."""

    def attend(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Store this step's k, v and attend each sequence over its whole context.

        q: (B, H, Dh) and k, v: (B, Hkv, Dh), rotary already applied. Returns (B, H, Dh).
        """
        ...


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x: (N, D) -> (N, D)"""
    ms = np.einsum("nd,nd->n", x, x, dtype=np.float32) / np.float32(x.shape[-1])
    return x * (1.0 / np.sqrt(ms + np.float32(eps)))[:, None].astype(np.float32) * weight


def silu_mul(gate_up: np.ndarray) -> np.ndarray:
    """gate_up: (N, 2F) -> silu(gate) * up: (N, F)"""
    f = gate_up.shape[1] // 2
    gate, up = gate_up[:, :f], gate_up[:, f:]
    return gate / (1.0 + np.exp(-gate)) * up


def softmax_inplace(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in place; masked entries hold -inf."""
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


class RotaryTable:
    """Precomputed RoPE cos/sin for every position (Hugging Face rotate-half layout)."""

    def __init__(self, cfg: ModelConfig):
        half = cfg.head_dim // 2
        inv_freq = 1.0 / (cfg.rope_base ** (np.arange(half, dtype=np.float64) * 2.0 / cfg.head_dim))
        angles = np.arange(cfg.context_length, dtype=np.float64)[:, None] * inv_freq[None, :]
        self.cos = np.cos(angles).astype(np.float32)  # (context, Dh/2)
        self.sin = np.sin(angles).astype(np.float32)  # (context, Dh/2)

    def apply(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """x: (N, heads, Dh) at positions (N,) -> rotated copy (N, heads, Dh)."""
        half = x.shape[-1] // 2
        c = self.cos[positions][:, None, :]  # (N, 1, Dh/2)
        s = self.sin[positions][:, None, :]
        x1, x2 = x[..., :half], x[..., half:]
        out = np.empty_like(x)
        out[..., :half] = x1 * c - x2 * s
        out[..., half:] = x2 * c + x1 * s
        return out


class Transformer:
    """Runs the model; holds no per-request state."""

    def __init__(self, weights: ModelWeights):
        self.weights = weights
        self.cfg = weights.config
        self.rope = RotaryTable(self.cfg)
        self._scale = np.float32(1.0 / np.sqrt(self.cfg.head_dim))

    # -- shared layer pieces -------------------------------------------------------------------

    def _qkv(self, layer: int, x: np.ndarray, positions: np.ndarray):
        """x: (N, D) -> q (N, H, Dh), k (N, Hkv, Dh), v (N, Hkv, Dh), rotary applied."""
        c, w = self.cfg, self.weights.layers[layer]
        qkv = rms_norm(x, w.attn_norm, c.rms_eps) @ w.wqkv  # (N, (H + 2Hkv) * Dh)
        n = x.shape[0]
        q_end, k_end = c.n_heads * c.head_dim, (c.n_heads + c.n_kv_heads) * c.head_dim
        q = self.rope.apply(qkv[:, :q_end].reshape(n, c.n_heads, c.head_dim), positions)
        k = self.rope.apply(qkv[:, q_end:k_end].reshape(n, c.n_kv_heads, c.head_dim), positions)
        v = np.ascontiguousarray(qkv[:, k_end:].reshape(n, c.n_kv_heads, c.head_dim))
        return q, k, v

    def _finish_layer(self, layer: int, x: np.ndarray, attn: np.ndarray) -> np.ndarray:
        """x: (N, D), attn: (N, H*Dh) -> x after the output projection and the MLP, (N, D)."""
        c, w = self.cfg, self.weights.layers[layer]
        x = x + attn @ w.wo
        h = rms_norm(x, w.ffn_norm, c.rms_eps) @ w.w_gate_up  # (N, 2F)
        x += silu_mul(h) @ w.w_down
        return x

    def logits(self, x: np.ndarray) -> np.ndarray:
        """x: (N, D) final hidden states -> (N, V)"""
        return rms_norm(x, self.weights.final_norm, self.cfg.rms_eps) @ self.weights.lm_head

    # -- prefill ---------------------------------------------------------------------------

    def causal_attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, past: int = 0) -> np.ndarray:
        """q: (T, H, Dh), k, v: (past + T, Hkv, Dh) -> (T, H*Dh), causal, grouped-query: query i sits at
        position past + i and sees keys 0..past + i."""
        c = self.cfg
        t = q.shape[0]
        g = c.group_size
        kt = k.transpose(1, 2, 0)  # (Hkv, Dh, past + T)
        vh = v.transpose(1, 0, 2)  # (Hkv, past + T, Dh)
        out = np.empty((t, c.n_heads, c.head_dim), dtype=np.float32)
        for start in range(0, t, PREFILL_QUERY_CHUNK):
            stop = min(t, start + PREFILL_QUERY_CHUNK)
            seen = past + stop  # keys these queries may see
            # (Hkv, G*n, Dh): query heads of one KV group stacked along rows
            qc = q[start:stop].reshape(stop - start, c.n_kv_heads, g, c.head_dim)
            qc = qc.transpose(1, 2, 0, 3).reshape(c.n_kv_heads, g * (stop - start), c.head_dim)
            scores = (qc * self._scale) @ kt[:, :, :seen]  # (Hkv, G*n, seen)
            scores = scores.reshape(c.n_kv_heads, g, stop - start, seen)
            mask = np.arange(seen)[None, :] > np.arange(past + start, past + stop)[:, None]  # (n, seen)
            scores[:, :, mask] = -np.inf
            probs = softmax_inplace(scores).reshape(c.n_kv_heads, g * (stop - start), seen)
            ctx = probs @ vh[:, :seen]  # (Hkv, G*n, Dh)
            out[start:stop] = ctx.reshape(c.n_kv_heads, g, stop - start, c.head_dim).transpose(2, 0, 1, 3).reshape(
                stop - start, c.n_heads, c.head_dim)
        return out.reshape(t, c.n_heads * c.head_dim)

    def _check_ids(self, token_ids) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("token_ids: need a non-empty 1-D sequence")
        if ids.size > self.cfg.context_length:
            raise ValueError(f"token_ids: {ids.size} tokens exceed the context window {self.cfg.context_length}")
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            raise ValueError(f"token_ids: ids must lie in [0, {self.cfg.vocab_size})")
        return ids

    def prefill(self, token_ids, on_layer: LayerKVCallback | None = None, all_logits: bool = False):
        """Run a whole prompt.

        Returns (logits, ks, vs): logits (V,) for the last position, or (T, V) with all_logits;
        ks, vs: lists over layers of (T, Hkv, Dh). `on_layer(layer, k, v)` is called as soon as
        each layer's K/V exist, so a transfer can overlap the remaining layers.
        """
        ids = self._check_ids(token_ids)
        if all_logits:
            x, ks, vs = self._forward_prompts([ids], None)
            return self.logits(x), ks[0], vs[0]
        callback = None if on_layer is None else (lambda layer, _i, k, v: on_layer(layer, k, v))
        logits, ks, vs = self.prefill_batch([ids], callback)
        return logits[0], ks[0], vs[0]

    def prefill_batch(self, prompts: list, on_layer: Callable[[int, int, np.ndarray, np.ndarray], None] | None = None):
        """Prefill several prompts together: the projections and MLP run as one GEMM over all tokens.

        Returns (logits (N, V) at each prompt's last position, ks, vs) with ks[i][layer]: (T_i, Hkv, Dh).
        `on_layer(layer, prompt_index, k, v)` fires per prompt as soon as the layer's K/V exist.
        """
        ids = [self._check_ids(p) for p in prompts]
        x, ks, vs = self._forward_prompts(ids, on_layer)
        ends = np.cumsum([p.size for p in ids]) - 1
        return self.logits(x[ends]), ks, vs

    def prefill_chunk(self, token_ids, past_ks: list[np.ndarray], past_vs: list[np.ndarray],
                      on_layer: LayerKVCallback | None = None):
        """Continue a prompt (chunked prefill): `token_ids` follow the P tokens whose K/V are past_ks,
        past_vs (per layer (P, Hkv, Dh); empty lists: P = 0). Returns (logits (V,) at the chunk's last
        position, ks, vs: per layer the chunk's own (n, Hkv, Dh)); chunk after chunk gives what
        `prefill` of the whole prompt gives. `on_layer(layer, k, v)` gets the chunk's K/V per layer."""
        ids = self._check_ids(token_ids)
        past = int(past_ks[0].shape[0]) if past_ks else 0
        if past + ids.size > self.cfg.context_length:
            raise ValueError(f"token_ids: {past} + {ids.size} tokens exceed the context window "
                             f"{self.cfg.context_length}")
        positions = np.arange(past, past + ids.size)  # (n,)
        x = self.weights.token_embedding[ids].astype(np.float32)  # (n, D)
        ks, vs = [], []
        for layer in range(self.cfg.n_layers):
            q, k, v = self._qkv(layer, x, positions)
            ks.append(k)
            vs.append(v)
            if on_layer is not None:
                on_layer(layer, k, v)
            if past:
                k, v = np.concatenate([past_ks[layer], k]), np.concatenate([past_vs[layer], v])
            x = self._finish_layer(layer, x, self.causal_attention(q, k, v, past))
        return self.logits(x[-1:])[0], ks, vs

    def _forward_prompts(self, ids: list[np.ndarray], on_layer):
        """Hidden states (sum T, D) after the last layer, and per-prompt per-layer K/V."""
        bounds = np.concatenate([[0], np.cumsum([p.size for p in ids])])
        positions = np.concatenate([np.arange(p.size) for p in ids])  # (sum T,)
        x = self.weights.token_embedding[np.concatenate(ids)].astype(np.float32)  # (sum T, D)
        ks: list[list[np.ndarray]] = [[] for _ in ids]
        vs: list[list[np.ndarray]] = [[] for _ in ids]
        attn = np.empty((x.shape[0], self.cfg.n_heads * self.cfg.head_dim), dtype=np.float32)
        for layer in range(self.cfg.n_layers):
            q, k, v = self._qkv(layer, x, positions)
            for i in range(len(ids)):  # attention is per prompt (ragged); everything else is batched
                s, e = bounds[i], bounds[i + 1]
                ks[i].append(k[s:e])
                vs[i].append(v[s:e])
                if on_layer is not None:
                    on_layer(layer, i, k[s:e], v[s:e])
                attn[s:e] = self.causal_attention(q[s:e], k[s:e], v[s:e])
            x = self._finish_layer(layer, x, attn)
        return x, ks, vs

    # -- decode ----------------------------------------------------------------------------

    def decode_step(self, token_ids: np.ndarray, positions: np.ndarray, cache: AttentionCache) -> np.ndarray:
        """One token for each of B sequences: token_ids (B,), positions (B,) -> logits (B, V).

        Every projection is one GEMM over the batch; attention goes through `cache`.
        """
        c = self.cfg
        x = self.weights.token_embedding[token_ids].astype(np.float32)  # (B, D)
        for layer in range(c.n_layers):
            q, k, v = self._qkv(layer, x, positions)
            attn = cache.attend(layer, q, k, v)  # (B, H, Dh)
            x = self._finish_layer(layer, x, attn.reshape(x.shape[0], c.n_heads * c.head_dim))
        return self.logits(x)


class DenseKVCache:
    """Contiguous per-sequence KV cache for a fixed batch: the simple reference layout."""

    def __init__(self, cfg: ModelConfig, batch: int, max_tokens: int):
        shape = (cfg.n_layers, batch, max_tokens, cfg.n_kv_heads, cfg.head_dim)
        self.cfg = cfg
        self.k = np.zeros(shape, dtype=np.float32)  # (L, B, Tmax, Hkv, Dh)
        self.v = np.zeros(shape, dtype=np.float32)
        self.lengths = np.zeros(batch, dtype=np.int64)  # (B,) tokens stored per sequence

    def load_prefill(self, slot: int, ks: list[np.ndarray], vs: list[np.ndarray]) -> None:
        t = ks[0].shape[0]
        for layer in range(self.cfg.n_layers):
            self.k[layer, slot, :t] = ks[layer]
            self.v[layer, slot, :t] = vs[layer]
        self.lengths[slot] = t

    def attend(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        c = self.cfg
        b = q.shape[0]
        rows = np.arange(b)
        self.k[layer, rows, self.lengths] = k
        self.v[layer, rows, self.lengths] = v
        t = int(self.lengths.max()) + 1
        kk = self.k[layer, :, :t].transpose(0, 2, 3, 1)  # (B, Hkv, Dh, t)
        vv = self.v[layer, :, :t].transpose(0, 2, 1, 3)  # (B, Hkv, t, Dh)
        qg = q.reshape(b, c.n_kv_heads, c.group_size, c.head_dim) * np.float32(1.0 / np.sqrt(c.head_dim))
        scores = qg @ kk  # (B, Hkv, G, t)
        mask = np.arange(t)[None, :] > self.lengths[:, None]  # (B, t)
        scores = np.where(mask[:, None, None, :], -np.inf, scores)
        probs = softmax_inplace(scores)
        out = probs @ vv  # (B, Hkv, G, Dh)
        if layer == c.n_layers - 1:
            self.lengths += 1
        return out.reshape(b, c.n_heads, c.head_dim)
