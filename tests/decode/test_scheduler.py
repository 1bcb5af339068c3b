"""The pure continuous-batching scheduler: admission, finishing, preemption, aborts, no leaks."""
from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from decode.allocator import BlockAllocator
from decode.scheduler import DecodeSeq, Scheduler, SeqStatus
from model.finish import FinishReason

EOS = 2


def add(sched: Scheduler, rid: str, n_tokens: int, max_tokens: int = 10, first: int = 7):
    sched.alloc.allocate(rid, n_tokens + 1)  # what the KV pool does at open
    return sched.add(DecodeSeq(rid, n_tokens, [first], max_tokens, frozenset({EOS})))


def step(sched: Scheduler, token: int = 7):
    plan = sched.schedule()
    done = sched.on_step_done([token] * len(plan.batch)) if plan.batch else []
    return plan, done


def test_first_token_counts_against_max_tokens_and_stop():
    s = Scheduler(BlockAllocator(16, 4), max_batch=4)
    assert add(s, "one", 3, max_tokens=1).reason is FinishReason.LENGTH
    assert add(s, "eos", 3, first=EOS).reason is FinishReason.STOP
    assert s.alloc.free_blocks == 16 and not s.has_work


def test_runs_until_max_tokens_then_releases():
    s = Scheduler(BlockAllocator(16, 4), max_batch=4)
    add(s, "a", 3, max_tokens=3)
    add(s, "b", 5, max_tokens=5)
    plan, done = step(s)
    assert [q.request_id for q in plan.batch] == ["a", "b"] and done == []
    _, done = step(s)
    assert [(d.request_id, d.reason, len(d.generated)) for d in done] == [("a", FinishReason.LENGTH, 3)]
    _, done = step(s, token=EOS)
    assert [(d.request_id, d.reason, d.generated[-1]) for d in done] == [("b", FinishReason.STOP, EOS)]
    assert s.alloc.free_blocks == 16


def test_add_refuses_a_sequence_that_can_never_fit():
    s = Scheduler(BlockAllocator(4, 4), max_batch=4)
    with pytest.raises(ValueError, match="max_tokens"):
        add(s, "big", 10, max_tokens=8)  # 17 tokens > 16


def test_max_batch_limits_admission_fifo():
    s = Scheduler(BlockAllocator(32, 4), max_batch=2)
    for rid in "abc":
        add(s, rid, 2, max_tokens=2)
    plan, _ = step(s)
    assert [q.request_id for q in plan.batch] == ["a", "b"] and s.get("c").status is SeqStatus.WAITING
    plan, _ = step(s)
    assert [q.request_id for q in plan.batch] == ["c"]


def test_preemption_is_lifo_and_recompute_readmits_in_order():
    s = Scheduler(BlockAllocator(6, 4), max_batch=4)
    add(s, "a", 7, max_tokens=16)  # 8 tokens: 2 blocks; at most 22 tokens of 24 in the end
    add(s, "b", 7, max_tokens=16)
    add(s, "c", 3, max_tokens=16)  # 4 tokens: 1 block -> 1 free
    step(s)  # a, b, c run: contexts 8, 8, 4
    plan, _ = step(s)  # a, b need a 3rd block: a takes the free one, b preempts c (the newest), then b fits
    assert plan.preempted == ["c"] and [q.request_id for q in plan.batch] == ["a", "b"]
    assert s.get("c").status is SeqStatus.PREEMPTED and s.get("c").n_preemptions == 1
    preempted, recomputed, finished = ["c"], [], []
    for _ in range(60):
        plan, done = step(s)
        preempted += plan.preempted
        recomputed += [q.request_id for q in plan.recompute]
        finished += [d.request_id for d in done]
        if not s.has_work:
            break
    assert sorted(finished) == ["a", "b", "c"] and s.alloc.free_blocks == 6
    assert preempted[:2] == ["c", "b"]  # newest admitted first
    assert recomputed[:2] == ["b", "c"]  # back in admission order
    s.alloc.check()


def test_abort_during_a_step_is_deferred_until_the_step_is_done():
    s = Scheduler(BlockAllocator(16, 4), max_batch=4)
    add(s, "a", 3)
    add(s, "b", 3)
    s.schedule()
    assert s.abort("a") is None and s.alloc.holds("a")  # its KV is being written
    done = s.on_step_done([7, 7])
    assert [(d.request_id, d.reason, len(d.generated)) for d in done] == [("a", FinishReason.ABORT, 1)]
    assert not s.alloc.holds("a")
    assert s.abort("b").reason is FinishReason.ABORT and s.abort("b") is None
    assert s.alloc.free_blocks == 16


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "step", "abort", "eos"]), st.integers(0, 7),
                              st.integers(1, 30)), max_size=60),
       n_blocks=st.integers(4, 24), block_size=st.sampled_from([1, 2, 4, 16]), max_batch=st.integers(1, 5))
def test_random_operations_never_leak_blocks(ops, n_blocks, block_size, max_batch):
    alloc = BlockAllocator(n_blocks, block_size)
    s = Scheduler(alloc, max_batch)
    live = set()
    for i, (op, who, n) in enumerate(ops):
        rid = f"r{who}"
        if op == "add" and rid not in live:
            if alloc.can_allocate(n + 1) and n + n % 7 <= alloc.capacity_tokens:
                add(s, rid, n, max_tokens=1 + n % 7)
                live.add(rid)
        elif op == "abort":
            s.abort(rid)
        else:
            plan = s.schedule()
            for seq in plan.batch:  # every running sequence owns room for the token it is fed
                assert alloc.capacity_of(seq.request_id) >= seq.context_len + 1
            if plan.batch:
                s.on_step_done([EOS if op == "eos" else 7] * len(plan.batch))
        live = {r for r in live if s.get(r) is not None}
        alloc.check()
    for rid in list(live):
        s.abort(rid)
    assert alloc.free_blocks == n_blocks and not s.has_work


def test_waiting_sequences_run_while_a_preempted_one_cannot_fit():
    """Regression: waiting sequences hold every free block, a preempted one waits, nothing runs."""
    s = Scheduler(BlockAllocator(4, 4), max_batch=4)
    add(s, "a", 7, max_tokens=3)  # 2 blocks
    add(s, "b", 3, max_tokens=10)  # 1 block
    step(s)  # a: 8 tokens, b: 4
    plan, done = step(s)  # a grows to 3 blocks; b must give its block back
    assert plan.preempted == ["b"] and [d.request_id for d in done] == ["a"]
    add(s, "c", 7, max_tokens=2)  # the two waiting sequences take all 4 free blocks,
    add(s, "d", 7, max_tokens=2)  # more than the preempted b (5 tokens, 2 blocks) could get
    finished = []
    for _ in range(20):
        if not s.has_work:
            break
        _, done = step(s)
        finished += [d.request_id for d in done]
    assert sorted(finished) == ["b", "c", "d"] and s.alloc.free_blocks == 4
