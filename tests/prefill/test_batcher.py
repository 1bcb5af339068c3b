import pytest
from hypothesis import given, settings, strategies as st

from prefill.batcher import PrefillBatcher, PrefillItem


def test_packs_under_budget_in_arrival_order():
    b = PrefillBatcher(token_budget=100, max_batch=8)
    for i, n in enumerate([40, 50, 30, 10]):
        b.add(PrefillItem(f"r{i}", n, arrival_s=i))
    assert [it.request_id for it in b.next_batch()] == ["r0", "r1"]  # 40 + 50; 30 would exceed 100
    assert [it.request_id for it in b.next_batch()] == ["r2", "r3"]
    assert b.next_batch() == [] and b.queued_tokens == 0


def test_oversized_prompt_runs_alone_and_priority_goes_first():
    b = PrefillBatcher(token_budget=100, max_batch=8)
    b.add(PrefillItem("long", 500, arrival_s=0))
    b.add(PrefillItem("urgent", 10, arrival_s=1, priority=5))
    assert [it.request_id for it in b.next_batch()] == ["urgent"]
    assert [it.request_id for it in b.next_batch()] == ["long"]


def test_remove_and_max_batch():
    b = PrefillBatcher(token_budget=1000, max_batch=2)
    for i in range(3):
        b.add(PrefillItem(f"r{i}", 5, arrival_s=i))
    assert b.remove("r1") and not b.remove("r1")
    assert [it.request_id for it in b.next_batch()] == ["r0", "r2"]


@pytest.mark.parametrize("budget,batch", [(0, 1), (1, 0)])
def test_rejects_bad_settings(budget, batch):
    with pytest.raises(ValueError, match="token_budget|max_batch"):
        PrefillBatcher(budget, batch)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(0, 3)), min_size=1, max_size=40), st.integers(1, 400))
def test_every_prompt_is_batched_exactly_once(items, budget):
    b = PrefillBatcher(budget, max_batch=4)
    for i, (n, prio) in enumerate(items):
        b.add(PrefillItem(f"r{i}", n, arrival_s=float(i), priority=prio))
    seen = []
    while batch := b.next_batch():
        assert len(batch) <= 4
        assert len(batch) == 1 or sum(it.n_tokens for it in batch) <= budget
        seen += [it.request_id for it in batch]
    assert sorted(seen) == sorted(f"r{i}" for i in range(len(items))) and b.queued_tokens == 0
