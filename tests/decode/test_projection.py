"""Projection: the small-batch paths (row blocks, vector blocks) give the plain GEMM's result, on one thread or two."""
from __future__ import annotations

import numpy as np
import pytest

from decode.attention import Workspace
from decode.core import DecodeCore, model_layout
from decode.pool import PagedKVPool
from decode.projection import SMALL_KERNEL_MNK, contiguous_projections, vector_block_rows


@pytest.mark.parametrize("n_in,n_out", [(576, 960), (576, 576), (576, 3072), (1536, 576), (7, 5)])
@pytest.mark.parametrize("batch", [2, 3, 8, 32])
def test_row_blocks_cover_every_row_once_in_an_even_number_of_equal_blocks(n_in, n_out, batch):
    (p,) = contiguous_projections([np.zeros((n_in, n_out), np.float32)])
    blocks = p.row_blocks(batch)
    rows = np.concatenate([np.arange(lo, hi) for lo, hi in blocks])
    assert np.array_equal(rows, np.arange(n_out))
    assert len(blocks) % 2 == 0
    sizes = [hi - lo for lo, hi in blocks]
    assert set(sizes[:-1]) == {sizes[0]} and 0 < sizes[-1] <= sizes[0]
    if 16 * batch * n_in <= SMALL_KERNEL_MNK:  # the limit allows at least a 16-row block
        assert sizes[0] * batch * n_in <= SMALL_KERNEL_MNK


def test_contiguous_projections_lie_back_to_back_in_the_given_order():
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal(shape, dtype=np.float32) for shape in [(6, 10), (4, 6), (6, 3)]]  # (in, out)
    ps = contiguous_projections(ws)
    base = ps[0].w.__array_interface__["data"][0]
    offset = 0
    for w, p in zip(ws, ps):
        assert p.w.shape == w.T.shape and p.w.flags.c_contiguous and np.array_equal(p.w, w.T)
        assert p.w.__array_interface__["data"][0] == base + 4 * offset
        offset += w.size
    x = rng.standard_normal((6, 2), dtype=np.float32)
    np.testing.assert_allclose(ps[0].apply(x, np.empty((10, 2), np.float32)), ws[0].T @ x, rtol=1e-6)


@pytest.mark.parametrize("n_out", [960, 576, 3072, 49152, 7, 6, 1])
def test_vector_blocks_divide_the_rows_into_an_even_number_of_blocks_or_one(n_out):
    rows = vector_block_rows(n_out)
    assert n_out % rows == 0
    assert (n_out // rows) % 2 == 0 or rows == n_out
    if n_out % 256 == 0 and (n_out // 256) % 2 == 0:
        assert rows == 256


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("vectors", [False, True])
def test_small_batch_paths_match_the_plain_product(threads, order, vectors):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((576, 960), dtype=np.float32)  # (in, out)
    (p,) = contiguous_projections([w])
    ws = Workspace(threads)
    for batch in (2, 5, 8):
        x = np.asarray(rng.standard_normal((576, batch), dtype=np.float32), order=order)  # (in, B)
        want = w.T @ x
        got = p.apply(x, np.full((960, batch), np.nan, np.float32), ws.split, vectors)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(p.apply(x, np.empty((960, batch), np.float32)), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("vectors", [False, True])
def test_core_logits_agree_with_and_without_the_small_batch_path(lm, book, threads, vectors):
    model = lm.model
    ref = book.get(3)
    pool = PagedKVPool(model_layout(model), 16, capacity_tokens=8 * 128)
    ids = [f"s{i}" for i in range(4)]
    for rid in ids:
        pool.load_sequence(rid, ref.ks, ref.vs)
        pool.claim(rid)
    n = len(ref.prompt)
    # both small-batch paths, whichever this host's OpenBLAS core would pick
    blocks, plain = (DecodeCore(model, pool, threads=threads, small_max_batch=k, vectors=vectors) for k in (8, 0))
    batch = blocks.batch_input(ids, ref.tokens[:4], [n] * 4)
    got = blocks.forward(batch)  # (B, V); writes the fed tokens' KV, which the second call rewrites alike
    want = plain.forward(batch)
    assert got.shape == want.shape == (4, model.cfg.vocab_size) and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert np.array_equal(got.argmax(axis=1), want.argmax(axis=1))


@pytest.mark.parametrize("batch", [1, 4])
def test_core_logits_agree_with_gemv_and_gemm_attention(lm, book, batch, monkeypatch):
    """`vectors` also picks the attention's products (decode/attention.py): both forms, one answer."""
    import decode.attention
    forms = []
    scores = decode.attention._scores
    monkeypatch.setattr(decode.attention, "_scores",
                        lambda k, q, out, gemv: (forms.append(gemv), scores(k, q, out, gemv)))
    model = lm.model
    ref = book.get(3)
    pool = PagedKVPool(model_layout(model), 16, capacity_tokens=8 * 128)
    ids = [f"s{i}" for i in range(batch)]
    for rid in ids:
        pool.load_sequence(rid, ref.ks, ref.vs)
        pool.claim(rid)
    gemv, gemm = (DecodeCore(model, pool, small_max_batch=0, vectors=v) for v in (True, False))
    step = gemv.batch_input(ids, ref.tokens[:batch], [len(ref.prompt)] * batch)
    got, want = gemv.forward(step), gemm.forward(step)
    n_layers = model.cfg.n_layers
    assert forms == [True] * n_layers + [False] * n_layers  # the flag reached every layer's attention
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert np.array_equal(got.argmax(axis=1), want.argmax(axis=1))
