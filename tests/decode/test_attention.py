"""Paged attention (both paths) against the dense reference cache, on random data."""
from __future__ import annotations

import numpy as np
import pytest

from decode.attention import BatchInput, PagedBatchAttention, Workspace
from decode.pool import PagedKVPool
from kvtransfer.layout import KVLayout
from model.config import ModelConfig
from model.transformer import DenseKVCache

CFG = ModelConfig(name="tiny", n_layers=2, d_model=24, d_ff=8, n_heads=6, n_kv_heads=2, head_dim=4, rope_base=1e4,
                  rms_eps=1e-5, vocab_size=10, context_length=256, bos_token_id=1, eos_token_id=2,
                  tied_embeddings=True)


@pytest.mark.parametrize("gemv", [False, True])
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("split", [False, True])
def test_paged_attention_matches_the_dense_cache(gather, block_size, split, gemv, monkeypatch):
    if split:  # the in-place path's block range on two threads
        monkeypatch.setattr("decode.attention.SPLIT_MIN_TOKENS", 0)
    check_against_dense([1, 7, 16, 33, 2, 20], block_size, gather, gemv)


@pytest.mark.parametrize("gemv", [False, True])
@pytest.mark.parametrize("length", [1, 3, 16, 40])
def test_single_row_view_matches_the_dense_cache(length, gemv):
    """A batch of one with consecutive blocks attends over a view of the pool (PagedBatchAttention._single)."""
    assert check_against_dense([length], 4, gather=True, gemv=gemv, foreign=False).single


def check_against_dense(lengths: list[int], block_size: int, gather: bool, gemv: bool,
                        foreign: bool = True) -> PagedBatchAttention:
    """Attend each layer through the pool and through DenseKVCache on the same random data; foreign:
    interleave blocks no batch row owns, holding NaN (another request's KV must not leak in)."""
    rng = np.random.default_rng(block_size + len(lengths))
    lengths = np.array(lengths)  # tokens stored before this step
    b, tmax = len(lengths), int(lengths.max()) + 1
    pool = PagedKVPool(KVLayout(CFG.n_layers, CFG.n_kv_heads, CFG.head_dim), block_size, capacity_tokens=512)
    if foreign:
        pool.allocator.allocate("other", 20)  # blocks no batch row owns, inside the scored range
    dense = DenseKVCache(CFG, b, tmax)
    for row, n in enumerate(lengths):
        ks = [rng.standard_normal((n, 2, 4), dtype=np.float32) for _ in range(CFG.n_layers)]
        vs = [rng.standard_normal((n, 2, 4), dtype=np.float32) for _ in range(CFG.n_layers)]
        pool.load_sequence(f"r{row}", ks, vs)
        pool.allocator.extend(f"r{row}", n + 1)
        dense.load_prefill(row, ks, vs)
        if foreign:
            pool.allocator.allocate(f"gap{row}", block_size)
    if foreign:
        for rid in ["other"] + [f"gap{row}" for row in range(b)]:
            blocks = pool.allocator.block_table(rid)
            pool.k[:, :, blocks] = np.nan
            pool.v[:, :, blocks] = np.nan
    nb = pool.allocator.blocks_for(tmax)
    tables = np.zeros((b, nb), dtype=np.int64)
    for row in range(b):
        t = pool.allocator.block_table(f"r{row}")
        tables[row, :len(t)] = t
    batch = BatchInput(np.zeros(b, dtype=np.int64), lengths.copy(), tables)
    paged = PagedBatchAttention(pool, batch, Workspace(), 1.0 / np.sqrt(CFG.head_dim), gemv=gemv)
    paged.gather = gather
    for layer in range(CFG.n_layers):
        q = rng.standard_normal((b, 6, 4), dtype=np.float32)
        k, v = rng.standard_normal((2, b, 2, 4), dtype=np.float32)
        want = dense.attend(layer, q, k, v)
        got = paged.attend(layer, q, k, v)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    return paged
