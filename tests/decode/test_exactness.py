"""Greedy outputs of the batched paged decode equal each sequence run alone through model/."""
from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from decode.core import ChunkInput, DecodeCore, model_layout
from decode.pool import PagedKVPool
from decode.scheduler import DecodeSeq, Scheduler
from model.finish import FinishReason
from tests.decode.driver import REF_TOKENS, Join, judge, run


def check_outcome(out, book, joins, record):
    ties = 0
    for i, j in enumerate(joins):
        rid = f"s{i}"
        if rid in out.refused:
            continue
        reason = out.reasons[rid]
        ok, tie = judge(out.generated[rid], book.get(j.prompt), reason is not FinishReason.ABORT, j.max_tokens)
        assert ok, f"{rid} (prompt {j.prompt}, max_tokens {j.max_tokens}) diverged: {out.generated[rid]} " \
                   f"vs {book.get(j.prompt).tokens}"
        ties += tie
    record("ties", ties)
    return ties


def test_sixteen_sequences_join_and_leave(lm, book, record_property):
    """16 prompts of 3..77 tokens join at steps 0..15 and leave after 1..16 tokens (some by abort)."""
    joins = [Join(prompt=i, step=i, max_tokens=1 + (5 * i) % REF_TOKENS,
                  abort_step=i + 6 if i % 5 == 4 else None) for i in range(16)]
    out, pool = run(lm, book, joins, capacity_tokens=4096, max_batch=16)
    assert out.max_batch_seen >= 8  # really batched
    ties = check_outcome(out, book, joins, record_property)
    assert ties <= 2, f"{ties} near-ties: suspicious"
    assert pool.allocator.free_blocks == pool.allocator.n_blocks
    assert any(r is FinishReason.ABORT for r in out.reasons.values())


def test_two_thread_step_is_exact(lm, book, record_property, monkeypatch):
    """The step with the attention helper thread (block range split in two halves) stays exact."""
    monkeypatch.setattr("decode.attention.SPLIT_MIN_TOKENS", 0)  # split even these small batches
    joins = [Join(prompt=i, step=i // 4, max_tokens=REF_TOKENS) for i in range(12)]
    out, pool = run(lm, book, joins, capacity_tokens=4096, max_batch=16, threads=2)
    assert out.max_batch_seen >= 8
    check_outcome(out, book, joins, record_property)
    assert pool.allocator.free_blocks == pool.allocator.n_blocks


def test_preemption_recompute_is_exact(lm, book, record_property):
    """A pool too small for the batch forces LIFO preemption; recomputed sequences stay exact."""
    joins = [Join(prompt=i, step=0, max_tokens=REF_TOKENS) for i in (8, 9, 10, 11, 12)]
    out, pool = run(lm, book, joins, capacity_tokens=16 * 18, block_size=16, max_batch=8)
    assert out.preemptions >= 1
    check_outcome(out, book, joins, record_property)
    assert pool.allocator.free_blocks == pool.allocator.n_blocks


join_strategy = st.builds(
    Join,
    prompt=st.integers(0, 15),
    step=st.integers(0, 8),
    max_tokens=st.integers(1, 12),
    abort_step=st.one_of(st.none(), st.integers(0, 16)),
)


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(joins=st.lists(join_strategy, min_size=1, max_size=6),
       capacity_blocks=st.sampled_from([7, 12, 64]), block_size=st.sampled_from([4, 16]),
       max_batch=st.integers(1, 6))
def test_random_join_leave_abort_schedules(lm, book, joins, capacity_blocks, block_size, max_batch):
    out, pool = run(lm, book, joins, capacity_tokens=capacity_blocks * 16, block_size=block_size,
                    max_batch=max_batch)
    check_outcome(out, book, joins, lambda *a: None)
    pool.allocator.check()
    assert pool.allocator.free_blocks == pool.allocator.n_blocks, "leaked blocks"


@pytest.mark.parametrize("threads", [1, 2])
def test_a_chunk_riding_the_steps_is_the_prompts_prefill_and_leaves_the_batch_exact(lm, book, threads):
    """Three sequences step while a 17-token prompt rides their steps 5 tokens at a time: the steps'
    logits are what steps without the chunk give, and the chunks' K/V and last logits are the
    prompt's own prefill (to float32 rounding of a different summation order)."""
    prompt = book.get(4).prompt

    def steps(with_chunk: bool):
        pool = PagedKVPool(model_layout(lm.model), 16, capacity_tokens=4096)
        sched, core = Scheduler(pool.allocator, 8), DecodeCore(lm.model, pool, threads=threads)
        for i in (1, 2, 3):
            ref = book.get(i)
            pool.load_sequence(f"s{i}", ref.ks, ref.vs)
            sched.add(DecodeSeq(f"s{i}", pool.claim(f"s{i}"), [ref.tokens[0]], 12, ()))
        out, ks, vs, at, chunk = [], [], [], 0, None
        while at < len(prompt):
            plan = sched.schedule()
            batch = core.batch_input([s.request_id for s in plan.batch], [s.next_token for s in plan.batch],
                                     [s.context_len for s in plan.batch])
            if with_chunk:
                ids = np.asarray(prompt[at:at + 5])
                chunk = ChunkInput(ids, at, ks, vs, last=at + len(ids) == len(prompt))
            logits = core.forward(batch, chunk)
            out.append(logits)
            sched.on_step_done(np.argmax(logits, axis=1))
            if with_chunk:
                ks = [np.concatenate([a, b]) for a, b in zip(ks, chunk.ks)] if ks else chunk.ks
                vs = [np.concatenate([a, b]) for a, b in zip(vs, chunk.vs)] if vs else chunk.vs
            at += 5
        return out, ks, vs, chunk

    plain, _, _, _ = steps(False)
    riding, ks, vs, last = steps(True)
    for a, b in zip(riding, plain):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
        assert (a.argmax(axis=1) == b.argmax(axis=1)).all()
    whole_logits, whole_ks, whole_vs = lm.model.prefill(prompt)
    np.testing.assert_allclose(last.logits, whole_logits, rtol=1e-4, atol=1e-3)
    for a, b in zip(ks + vs, list(whole_ks) + list(whole_vs)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
