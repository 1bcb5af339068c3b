"""The pure continuous-batching scheduler: handoff admission, finishing, preemption, aborts,
multi-step plans, no leaks."""
from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from decode.allocator import BlockAllocator, tokens_to_run
from decode.scheduler import DecodeSeq, Scheduler, SeqStatus
from model.finish import FinishReason

EOS = 2


def add(sched: Scheduler, rid: str, n_tokens: int, max_tokens: int = 10, first: int = 7, priority: int = 0):
    assert sched.alloc.reserve(rid, n_tokens)  # handoff admission, as the KV pool and the simulator do at open
    return sched.add(DecodeSeq(rid, n_tokens, [first], max_tokens, frozenset({EOS}), priority))


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


def test_preemption_takes_the_lowest_class_first_and_readmits_the_highest_first():
    s = Scheduler(BlockAllocator(6, 4), max_batch=4)
    add(s, "batch", 7, max_tokens=16, priority=0)  # admitted first, but the lowest class
    add(s, "chat", 7, max_tokens=16, priority=2)
    add(s, "mid", 3, max_tokens=16, priority=1)  # the newest: plain LIFO would take it
    step(s)
    plan, _ = step(s)  # batch and chat need a 3rd block: batch takes the free one, chat preempts batch
    assert plan.preempted == ["batch"] and [q.request_id for q in plan.batch] == ["chat", "mid"]
    s.alloc.check()
    for _ in range(60):  # everything still finishes
        plan, _ = step(s)
        if not s.has_work:
            break
    assert s.alloc.free_blocks == 6 and not s.has_work


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
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "step", "abort", "eos", "multi"]), st.integers(0, 7),
                              st.integers(1, 30)), max_size=60),
       n_blocks=st.integers(4, 24), block_size=st.sampled_from([1, 2, 4, 16]), max_batch=st.integers(1, 5))
def test_random_operations_never_leak_blocks(ops, n_blocks, block_size, max_batch):
    alloc = BlockAllocator(n_blocks, block_size)
    s = Scheduler(alloc, max_batch)
    live = set()
    for i, (op, who, n) in enumerate(ops):
        rid = f"r{who}"
        if op == "add" and rid not in live:
            free = alloc.free_blocks
            if n + n % 7 <= alloc.capacity_tokens and alloc.reserve(rid, n):
                s.add(DecodeSeq(rid, n, [7], 1 + n % 7, frozenset({EOS})))
                live.add(rid)
            else:  # refused: nothing held
                assert not alloc.holds(rid) and alloc.free_blocks == free
        elif op == "abort":
            s.abort(rid)
        else:
            plan = s.schedule(max_steps=n if op == "multi" else 1)
            for seq in plan.batch:  # every running sequence owns room for the tokens it is fed
                assert alloc.capacity_of(seq.request_id) >= seq.context_len + plan.steps
            if plan.batch:
                j = 1 + who % plan.steps  # the simulator may cut a plan short
                s.on_steps_done([[EOS if op == "eos" else 7] * j] * len(plan.batch))
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


def test_handoff_reservation_holds_prompt_and_first_step_or_nothing():
    a = BlockAllocator(5, 4)
    assert tokens_to_run(7) == 8 and a.reserve("a", 7) and len(a.block_table("a")) == 2  # 8 tokens: 2 blocks
    assert a.reserve("b", 8) and len(a.block_table("b")) == 3  # 9 tokens: 3 blocks, none left
    assert not a.reserve("c", 1) and not a.holds("c") and a.free_blocks == 0
    a.release("b")  # the transfer failed: its blocks go back
    assert a.reserve("c", 7) and a.free_blocks == 1
    a.check()


def test_a_reserved_sequence_runs_its_first_step_without_another_block():
    s = Scheduler(BlockAllocator(2, 4), max_batch=4)
    add(s, "a", 7, max_tokens=2)  # 7 prompt tokens + the first step's: both blocks
    assert s.alloc.free_blocks == 0
    plan = s.schedule()
    assert [q.request_id for q in plan.batch] == ["a"] and plan.preempted == [] and plan.steps == 1


def test_multi_step_plan_is_bounded_by_tokens_left():
    s = Scheduler(BlockAllocator(8, 4), max_batch=4)
    add(s, "a", 3, max_tokens=20)
    add(s, "b", 3, max_tokens=6)  # 5 tokens left to generate
    plan = s.schedule(max_steps=100)
    assert plan.steps == 5  # b may not finish before the last step
    assert all(s.alloc.capacity_of(q.request_id) >= q.context_len + 5 for q in plan.batch)
    done = s.on_steps_done([[7] * 5, [7] * 5])
    assert [(d.request_id, d.reason, len(d.generated)) for d in done] == [("b", FinishReason.LENGTH, 6)]
    assert (s.get("a").context_len, len(s.get("a").generated)) == (8, 6)


def test_multi_step_plan_is_bounded_by_free_blocks_and_may_be_cut_short():
    s = Scheduler(BlockAllocator(16, 4), max_batch=4)
    assert s.alloc.reserve("x", 51)  # a transfer in flight holds 13 blocks
    add(s, "a", 3, max_tokens=50)  # 1 block, 2 free
    plan = s.schedule(max_steps=100)
    assert plan.steps == 8 and s.alloc.free_blocks == 0  # room for 3 + 8 tokens: 3 blocks
    s.on_steps_done([[7, 7, 7]])  # cut after 3 steps
    assert (s.get("a").context_len, len(s.get("a").generated)) == (6, 4)


def test_a_stop_token_inside_a_multi_step_plan_ends_the_sequence_there():
    s = Scheduler(BlockAllocator(8, 4), max_batch=4)
    add(s, "a", 3, max_tokens=20)
    assert s.schedule(max_steps=4).steps == 4
    (done,) = s.on_steps_done([[7, EOS, 7, 7]])
    assert done.reason is FinishReason.STOP and done.generated == (7, 7, EOS) and s.alloc.free_blocks == 8


def test_k_steps_at_once_match_k_single_steps():
    def run(max_steps):
        s = Scheduler(BlockAllocator(64, 4), max_batch=4)
        for rid, n, m in (("a", 5, 30), ("b", 9, 12), ("c", 2, 7)):
            add(s, rid, n, max_tokens=m)
        out = []
        while s.has_work:
            plan = s.schedule(max_steps)
            out += [(d.request_id, d.generated) for d in s.on_steps_done([[7] * plan.steps] * len(plan.batch))]
        return sorted(out)
    assert run(100) == run(1)
