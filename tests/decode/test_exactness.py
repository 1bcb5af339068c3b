"""Greedy outputs of the batched paged decode equal each sequence run alone through model/."""
from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

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
