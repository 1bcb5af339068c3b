import math
import random

import numpy as np
import pytest

from hardware.perf import chunk_step_time, decode_step_time, kv_transfer_time, make_deployment, prefill_time
from hardware.profiles import get_profile
from model.specs import get_spec
from orchestrator.core.correction import Corrections, Factors, ttft_key
from orchestrator.core.predictor import (DecodePart, DecodeState, Estimate, Predictor, PredictRequest, PrefillPart,
                                         PrefillState, best_pair, completion_key, earliest_prefill, fewest_steps,
                                         kv_arrival_s)
from orchestrator.core.pairsearch import best_effort_pair, search_best_pair
from orchestrator.core.poolindex import DecodeIndex, PrefillIndex
from orchestrator.core.queueplan import QueuedPrompt, append_last, drop_first_batch, locate, plan_queue
from orchestrator.core.request import SLATarget
from prefill.batcher import PrefillBatcher, PrefillItem

MODEL = get_spec("llama-3.1-70b")
TRN = make_deployment(MODEL, get_profile("trn2.48xlarge"), tp=64)
CS3 = make_deployment(MODEL, get_profile("cs3@2024-08"), systems=4)  # launch: one pass per token
REQ = PredictRequest(prompt_tokens=2000, max_tokens=200, ttft_s=2.0, tpot_s=0.02)


def pstate(queue=(), busy_until=0.0, wid="p0", budget=4096, max_batch=8):
    return PrefillState(wid, TRN, budget, max_batch, tuple(queue), busy_until)


def targets(tightest, steps=1):
    """DecodeState.tpot_targets of sequences all with `tightest` (inf: none) and `steps` steps."""
    return () if tightest == math.inf else ((tightest, steps),)


def dstate(batch=8, ctx_per_seq=3000, wid="d0", free=10**6, tightest=math.inf, max_batch=64):
    return DecodeState(wid, CS3, batch, batch * ctx_per_seq, max_batch, free, targets(tightest))


def queue(n, tokens=1500):
    """n prompts queued ahead of REQ: their deadlines (arrival + 1 s) are all before REQ's 2 s."""
    return [QueuedPrompt(tokens, -1.0 - i, 0, 1.0) for i in range(n)]


def _batcher(q, budget, max_batch, extra=None):
    b = PrefillBatcher(budget, max_batch)
    for i, it in enumerate(q):
        b.add(PrefillItem(str(i), it.n_tokens, it.arrival_s, it.priority, it.ttft_s))
    if extra is not None:
        b.add(extra)
    out = []
    while len(b):
        out.append([it.request_id for it in b.next_batch()])
    return out


def test_queue_batches_match_the_prefill_batcher_on_random_queues():
    rng = random.Random(7)
    targets = [math.inf, 1.0, 2.0, 5.0]  # equal deadlines happen (arrivals are whole seconds): the tiebreaks
    for _ in range(400):
        budget, max_batch = rng.choice([64, 512, 4096]), rng.randint(1, 6)
        q = [QueuedPrompt(rng.choice([rng.randint(1, 100), rng.randint(1, 5000)]), float(rng.randint(-5, 0)),
                          rng.randint(0, 2), rng.choice(targets)) for _ in range(rng.randint(0, 14))]
        plan = plan_queue(TRN, tuple(q), budget, max_batch)
        assert [list(map(str, b)) for b in plan.batches] == _batcher(q, budget, max_batch)
        n, prio, ttft = rng.randint(1, 5000), rng.randint(0, 2), rng.choice(targets)
        slot = locate(plan, TRN, n, prio, 0.0, budget, max_batch, ttft_s=ttft)
        actual = _batcher(q, budget, max_batch, PrefillItem("new", n, 0.0, prio, ttft))
        k = next(i for i, b in enumerate(actual) if "new" in b)
        assert slot.batch == k
        assert sorted(map(str, slot.members)) == sorted(r for r in actual[k] if r != "new")
        lengths = {str(i): it.n_tokens for i, it in enumerate(q)} | {"new": n}
        assert sorted(slot.lengths) == sorted(lengths[r] for r in actual[k])
        before = sum(prefill_time(TRN, [lengths[r] for r in b]) for b in actual[:k])
        assert slot.before_s == pytest.approx(before, rel=1e-12, abs=1e-15)


def test_the_kept_up_plan_equals_planning_the_queue_again():
    """append_last / drop_first_batch (the simulator keeps its plans so) give exactly plan_queue's plan
    of the queue they stand for, or None where they cannot (a prompt that sorts before the last one)."""
    rng = random.Random(11)
    for _ in range(60):
        budget, max_batch = rng.choice([64, 512, 4096]), rng.randint(1, 6)
        b, queue, plan, clock = PrefillBatcher(budget, max_batch), [], plan_queue(TRN, (), budget, max_batch), 0.0
        for step in range(80):
            if rng.random() < 0.6:
                clock += rng.choice([0.0, 0.5])
                q = QueuedPrompt(rng.randint(1, 3000), clock, rng.choice([0, 0, 1]), rng.choice([2.0, 2.0, 0.5]))
                b.add(PrefillItem(str(step), q.n_tokens, q.arrival_s, q.priority, q.ttft_s))
                kept = append_last(plan, TRN, q, budget, max_batch)
                queue = [QueuedPrompt(it.n_tokens, it.arrival_s, it.priority, it.ttft_s) for it in b.waiting]
                if kept is not None:
                    assert queue[-1] == q  # it did join last
            else:
                taken = b.next_batch()
                kept = drop_first_batch(plan, len(taken)) if taken else plan
                queue = queue[len(taken):]
            fresh = plan_queue(TRN, tuple(queue), budget, max_batch)
            if kept is not None:
                assert kept == fresh
            plan = fresh


def test_a_longer_queue_predicts_a_longer_ttft():
    pred = Predictor()
    ttfts = [pred.prefill_part(REQ, pstate(queue(n)), CS3, 0.0).ttft.point_s for n in (0, 2, 6, 12)]
    assert ttfts == sorted(ttfts) and ttfts[-1] > ttfts[0] + 0.5
    busy = pred.prefill_part(REQ, pstate(busy_until=0.3), CS3, 0.0).ttft.point_s
    assert busy == pytest.approx(ttfts[0] + 0.3)


def test_an_earlier_deadline_jumps_the_queue_and_priority_breaks_ties():
    pred = Predictor()
    loose = [QueuedPrompt(1500, -1.0 - i, 0, 30.0) for i in range(6)]  # deadlines 23..28 s
    late = pred.prefill_part(PredictRequest(2000, 200, 40.0, 0.02), pstate(loose), CS3, 0.0)
    tight = pred.prefill_part(REQ, pstate(loose), CS3, 0.0)  # deadline 2 s: before all of them
    assert tight.batch == 0 < late.batch and tight.ttft.point_s < late.ttft.point_s
    same = [QueuedPrompt(1500, 0.0, 0, 2.0) for _ in range(6)]  # the same deadline as REQ
    low = pred.prefill_part(REQ, pstate(same), CS3, 0.0)
    high = pred.prefill_part(PredictRequest(2000, 200, 2.0, 0.02, priority=1), pstate(same), CS3, 0.0)
    assert high.batch == 0 < low.batch and high.ttft.point_s < low.ttft.point_s


def test_adding_a_sequence_raises_the_running_sequences_tpot():
    pred = Predictor()
    for batch in (1, 8, 32):
        d = pred.decode_part(REQ, dstate(batch))
        assert d.running_tpot.point_s > d.running_before_s > 0
    assert pred.decode_part(REQ, dstate(32)).step.point_s > pred.decode_part(REQ, dstate(8)).step.point_s
    # the documented approximation: batch + 1 at the context of the midpoint of the newcomer's 199 steps
    d = pred.decode_part(REQ, dstate(8))
    assert d.step.point_s == pytest.approx(decode_step_time(CS3, 9, 8 * 3000 + 2000 + 9 * 99))
    assert d.running_before_s == pytest.approx(decode_step_time(CS3, 8, 8 * 3000 + 8 * 99))
    assert d.wait.point_s == pytest.approx(0.5 * decode_step_time(CS3, 8, 8 * 3000))


def test_a_placement_that_would_push_a_running_sequence_past_its_target_is_refused():
    pred = Predictor()
    step = pred.decode_part(REQ, dstate(16)).step
    tight = pred.decode_part(REQ, dstate(16, tightest=step.bound_s * 0.999))
    loose = pred.decode_part(REQ, dstate(16, tightest=step.bound_s * 1.001))
    assert not tight.protects and loose.protects
    assert not pred.predict(REQ, pstate(), dstate(16, tightest=step.bound_s * 0.999), 0.0).ok
    assert pred.predict(REQ, pstate(), dstate(16, tightest=step.bound_s * 1.001), 0.0).ok
    assert not pred.decode_part(REQ, dstate(64, max_batch=64)).fits
    assert not pred.decode_part(REQ, dstate(4, free=REQ.prompt_tokens + REQ.max_tokens - 1)).fits


def test_bound_is_at_least_the_point_estimate():
    corr = Corrections(0.9)
    rng = random.Random(3)
    for _ in range(20):
        corr.observe("p0", "prefill", rng.uniform(0.5, 2.0), 1.0)
        corr.observe("d0", "decode", rng.uniform(0.5, 2.0), 1.0)
    for pred in (Predictor(), Predictor(corr), Predictor(corr, first_token_after_transfer=False)):
        for n in (0, 3, 9):
            x = pred.predict(REQ, pstate(queue(n), busy_until=0.05), dstate(n * 3), 0.0)
            assert x.ttft.bound_s >= x.ttft.point_s > 0
            assert x.tpot.bound_s >= x.tpot.point_s > 0
            assert x.running_tpot.bound_s >= x.running_tpot.point_s > 0


def test_corrections_move_predictions_toward_what_was_observed():
    base = Predictor()
    corr = Corrections(0.9, window=16)
    for phase, worker in (("prefill", "p0"), ("transfer", "p0"), ("decode", "d0")):
        for _ in range(16):
            corr.observe(worker, phase, 2.0, 1.0)
    pred = Predictor(corr)
    p0, p1 = base.prefill_part(REQ, pstate(queue(3)), CS3, 0.0), pred.prefill_part(REQ, pstate(queue(3)), CS3, 0.0)
    assert p1.prefill.point_s == pytest.approx(2 * p0.prefill.point_s)
    assert p1.transfer.point_s == pytest.approx(2 * p0.transfer.point_s)
    assert p1.ttft.point_s == pytest.approx(2 * p0.ttft.point_s)  # no batch in progress, no request path
    d0, d1 = base.decode_part(REQ, dstate(8)), pred.decode_part(REQ, dstate(8))
    assert d1.step.point_s == pytest.approx(2 * d0.step.point_s)
    assert d1.decode.point_s == pytest.approx(2 * d0.decode.point_s)
    assert pred.predict(REQ, pstate(), dstate(8), 0.0).tpot.point_s == pytest.approx(
        2 * base.predict(REQ, pstate(), dstate(8), 0.0).tpot.point_s)
    # another worker keeps the prior; the window forgets: 16 ratios of 1.0 bring it back
    assert pred.prefill_part(REQ, pstate(queue(3), wid="p1"), CS3, 0.0).ttft.point_s == pytest.approx(p0.ttft.point_s)
    for _ in range(16):
        corr.observe("p0", "prefill", 1.0, 1.0)
    assert corr.factors("p0", "prefill").point == pytest.approx(1.0)


def test_prior_spread_is_the_documented_lognormal():
    corr = Corrections(0.9, prior_sigma=0.1)
    f = corr.factors("never-seen", "decode")
    assert f.point == 1.0 and f.bound == pytest.approx(math.exp(1.2815516 * 0.1), rel=1e-6)
    for _ in range(4):  # below min_samples: still the prior
        corr.observe("d0", "decode", 3.0, 1.0)
    assert corr.factors("d0", "decode") == f


def test_a_batch_in_progress_has_left_what_its_ratio_above_the_time_so_far_gives():
    corr = Corrections(0.9, window=8)
    # cold, on time: the prior; cold and overrun: as far again beyond as the prior's spread
    assert corr.remaining("p0", "prefill", 2.0, 0.5) == pytest.approx((1.5, 2.0 * corr.prior.bound - 0.5))
    spread = corr.prior.bound
    assert corr.remaining("p0", "prefill", 2.0, 3.0) == pytest.approx((3.0 * spread - 3.0, 3.0 * spread ** 2 - 3.0))
    for r in (1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0, 3.0):
        corr.observe("p0", "prefill", r, 1.0)
    # just started: the whole window
    assert corr.remaining("p0", "prefill", 1.0, 0.0) == pytest.approx((1.4, 2.3))
    # 1.4 s into a 1 s batch: its ratio is one of 1.5, 1.8, 2.0, 3.0
    assert corr.remaining("p0", "prefill", 1.0, 1.4) == pytest.approx((1.9 - 1.4, 2.7 - 1.4))
    # past every ratio seen: still some left, never a batch predicted to end now
    point, bound = corr.remaining("p0", "prefill", 1.0, 3.5)
    f = corr.factors("p0", "prefill")
    assert point == pytest.approx(3.5 * f.bound / f.point - 3.5) and bound > point > 0

    # a quantile below the median (bound under point): an overrun batch still has time left
    low = Corrections(0.2, window=8)
    for r in (1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0, 3.0):
        low.observe("p0", "prefill", r, 1.0)
    g = low.factors("p0", "prefill")
    point, bound = low.remaining("p0", "prefill", 1.0, 3.5)
    assert point == pytest.approx(3.5 * g.point / g.bound - 3.5) and point > bound > 0
    assert bound == pytest.approx(3.5 * (g.point / g.bound) ** 0.4 - 3.5)


def test_the_batch_in_progress_end_bounds_the_wait_at_its_own_quantile():
    pred = Predictor()
    same = PrefillState("p0", TRN, 4096, 8, (), 1.0)
    later = PrefillState("p0", TRN, 4096, 8, (), 1.0, busy_bound_s=1.5)
    a, b = pred.prefill_part(REQ, same, CS3, 0.0), pred.prefill_part(REQ, later, CS3, 0.0)
    assert same.busy_bound_s == 1.0 and b.queue_wait.point_s == a.queue_wait.point_s
    assert b.queue_wait.bound_s == pytest.approx(a.queue_wait.bound_s + 0.5)
    with pytest.raises(ValueError, match="busy_bound_s"):
        PrefillState("p0", TRN, 4096, 8, (), 1.0, busy_bound_s=0.5)


def test_transfer_goes_into_tpot_when_the_first_token_leaves_before_it():
    live, sim = Predictor(), Predictor(first_token_after_transfer=False)
    a, b = live.predict(REQ, pstate(), dstate(8), 0.0), sim.predict(REQ, pstate(), dstate(8), 0.0)
    transfer = live.prefill_part(REQ, pstate(), CS3, 0.0).transfer.point_s
    assert a.ttft.point_s - b.ttft.point_s == pytest.approx(transfer)
    assert (b.tpot.point_s - a.tpot.point_s) * (REQ.max_tokens - 1) == pytest.approx(transfer)


@pytest.mark.parametrize("make,field", [
    (lambda: PredictRequest(-1, 10, 1.0, 0.1), "prompt_tokens"),
    (lambda: PredictRequest(10, 0, 1.0, 0.1), "max_tokens"),
    (lambda: PredictRequest(10, 10, float("nan"), 0.1), "ttft_s"),
    (lambda: PredictRequest(10, 10, 1.0, float("inf")), "tpot_s"),
    (lambda: PredictRequest(10, 10, 1.0, 0.0), "tpot_s"),
    (lambda: PredictRequest.from_sla(10, 10, SLATarget(float("nan"), 50)), "ttft_ms"),
    (lambda: Corrections(quantile=1.0), "quantile"),
    (lambda: Corrections(quantile=0.0), "quantile"),
    (lambda: Corrections(quantile=float("nan")), "quantile"),
    (lambda: Corrections().observe("p0", "prefill", 1.0, 0.0), "predicted_s"),
    (lambda: Corrections().observe("p0", "prefill", float("nan"), 1.0), "observed_s"),
    (lambda: Corrections().observe("p0", "sampling", 1.0, 1.0), "phase"),
    (lambda: QueuedPrompt(0, 0.0), "n_tokens"),
    (lambda: pstate(budget=0), "token_budget"),
    (lambda: PrefillState("p0", TRN, 4096, 8, (), float("nan")), "busy_until_s"),
    (lambda: DecodeState("d0", CS3, -1, 0, 64, 100), "batch"),
    (lambda: DecodeState("d0", CS3, 1, 10, 64, 100, ((float("nan"), 5),)), "tpot_targets"),
    (lambda: DecodeState("d0", CS3, 1, 10, 64, 100, ((0.02, 0),)), "tpot_targets"),
    (lambda: Predictor().prefill_part(REQ, pstate(), CS3, float("nan")), "now"),
])
def test_bad_inputs_raise_value_error_naming_the_field(make, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        make()


def test_big_model_predictions_agree_with_the_perf_model_and_are_plausible():
    pred = Predictor()
    x = pred.predict(REQ, pstate(), dstate(0), 0.0)  # idle pair: no queue, no running batch
    pf = prefill_time(TRN, [2000])
    tr = kv_transfer_time(TRN, CS3, MODEL.kv_bytes(2000), pf)
    assert x.ttft.point_s == pytest.approx(pf + tr)
    assert 0.05 < x.ttft.point_s < 1.0  # calibrated trn2 TP64: 0.576 s at Llama-3.3-70B's benchmark prompt
    step = decode_step_time(CS3, 1, 2000 + 198 / 2)
    assert x.tpot.point_s == pytest.approx(step)
    assert 1.5e-3 < x.tpot.point_s < 4e-3  # CS-3 x4 at ~450 tok/s/user
    busy = pred.predict(REQ, pstate(queue(4), busy_until=0.2), dstate(32), 0.0)
    assert busy.ttft.point_s == pytest.approx(0.2 + 2 * prefill_time(TRN, [1500, 1500]) + pf + tr)
    assert busy.tpot.point_s > x.tpot.point_s


def test_a_full_decode_worker_predicts_the_wait_for_a_slot_less_the_time_in_prefill():
    pred, step = Predictor(), dstate(64).step_now_s
    running = tuple((100 + 10 * i, 3000) for i in range(64))  # the first finishes in 100 steps
    free = pred.decode_part(REQ, dstate(63, tightest=1e-9))
    full = pred.decode_part(REQ, DecodeState("d0", CS3, 64, 64 * 3000, 64, 10**6, targets(1e-9), remaining=running))
    assert full.fits and full.protects  # a full batch does not grow: its sequences keep their TPOT
    assert full.wait.point_s == pytest.approx(0.5 * step + 100 * step, rel=1e-9)
    later = pred.decode_part(REQ, DecodeState("d0", CS3, 64, 64 * 3000, 64, 10**6, remaining=running), 0.1)
    assert later.wait.point_s == pytest.approx(full.wait.point_s - 0.1, rel=1e-9)  # it spent 0.1 s in prefill
    assert not free.protects and free.wait.point_s < full.wait.point_s
    behind = DecodeState("d0", CS3, 66, 64 * 3000, 64, 10**6, remaining=running)  # two already wait
    assert pred.decode_part(REQ, behind).wait.point_s == pytest.approx(0.5 * step + 120 * step, rel=1e-9)
    no_kv = DecodeState("d0", CS3, 10, 10 * 3000, 64, 1000, remaining=tuple((50 * (i + 1), 3000) for i in range(10)))
    assert no_kv.start_at_s(2200, 0.0, 0.01) == 0.5 and no_kv.start_at_s(7001, 0.0, 0.01) == 1.5  # +3000 per finish
    assert no_kv.start_at_s(7001, 1.2, 0.01) == 1.5 and no_kv.start_at_s(7001, 2.0, 0.01) == 2.0  # it came later
    coming = DecodeState("d0", CS3, 12, 10 * 3000, 64, 1000, remaining=no_kv.remaining, incoming=((0.2, 3000, 500, 3000), (9.0, 500, 10, 500)))
    assert coming.start_at_s(2200, 0.6, 0.01) == 1.0  # the first incoming took the first finisher's room
    assert coming.start_at_s(2200, 0.1, 0.01) == 0.5  # it arrives before that incoming request
    assert DecodeState("d0", CS3, 64, 64 * 3000, 64, 10**6).start_at_s(10, 0.0, 0.01) is None  # unknown: no room


def test_best_pair_counts_the_transfer_tail_and_the_decode_wait():
    e = lambda s: Estimate(s, s)  # noqa: E731
    req = PredictRequest(100, 11, 1.0, 0.0101)
    pp = [PrefillPart("pa", 0, e(0), e(0.2), e(0.05), e(0.2), e(0.05), 0.2),
          PrefillPart("pb", 0, e(0), e(0.21), e(0.001), e(0.21), e(0.001), 0.21)]
    dp = [DecodePart("da", True, e(0.005), e(0.0), e(0.05), 0.004, e(0.005), True, 0.005),
          DecodePart("db", True, e(0.004), e(0.0), e(0.04), 0.003, e(0.004), False, 0.004),  # would hurt its sequences
          DecodePart("dc", False, e(0.001), e(0.0), e(0.01), 0.001, e(0.001), True, 0.001)]  # no room
    p, d = best_pair(req, pp, dp)
    assert (p.worker_id, d.worker_id) == ("pb", "da")  # pa's tail finishes it later, and da fits pa's TPOT too
    tight = PredictRequest(100, 11, 1.0, 0.0099)  # (0.05 + 0.05) / 10 > 0.0099: only pb's small tail fits
    assert best_pair(tight, pp[:1], dp) is None and best_pair(tight, pp, dp)[0].worker_id == "pb"
    assert best_pair(PredictRequest(100, 11, 0.205, 0.0101), pp, dp)[0].worker_id == "pa"  # pb misses TTFT


def _random_pools(rng, n_prefill, n_decode):
    corr = Corrections(0.9, window=8, min_samples=2)
    for i in range(0, n_prefill, 3):
        for _ in range(3):
            corr.observe(f"p{i}", "prefill", rng.uniform(0.7, 1.6), 1.0)
            corr.observe(f"p{i}", "transfer", rng.uniform(0.7, 60.0), 1.0)  # some congested links
    for i in range(0, n_decode, 2):
        for _ in range(3):
            corr.observe(f"d{i}", "decode", rng.uniform(0.8, 1.4), 1.0)
    ps = [PrefillState(f"p{i}", TRN, 4096, 8, tuple(QueuedPrompt(rng.randint(1, 4000), -rng.random())
                                                     for _ in range(rng.randint(0, 8))), rng.uniform(-0.1, 0.3))
          for i in range(n_prefill)]
    ds = [DecodeState(f"d{i}", CS3, (b := rng.randint(0, 70)), b * rng.randint(100, 8000), 64,
                      rng.randint(0, 300_000), targets(rng.choice([math.inf, rng.uniform(0.002, 0.006)]),
                                                                rng.randint(1, 500)),
                      remaining=tuple(sorted((rng.randint(0, 800), rng.randint(100, 8000)) for _ in range(min(b, 64)))))
          for i in range(n_decode)]  # some full (batch > 64 or little KV): they wait for running sequences
    return corr, ps, ds


def _indexes(ps, ds):
    """Every worker healthy, every decode worker with room for any request."""
    return (PrefillIndex(ps, ps, [True] * len(ps)),
            DecodeIndex(ds, ds, [True] * len(ds), [d.free_kv_tokens + 10**9 for d in ds]))


def _random_request(rng, ttft_s=(0.2, 2.0), tpot_s=(0.002, 0.005), priority=0) -> PredictRequest:
    """Prompts of 1-6000 tokens, outputs of 1, 2 or up to 1000, targets drawn from the ranges (seconds)."""
    return PredictRequest(rng.randint(1, 6000), rng.choice([1, 2, rng.randint(2, 1000)]), rng.uniform(*ttft_s),
                          rng.uniform(*tpot_s), priority=priority)


@pytest.mark.parametrize("seed", range(6))
def test_decomposed_best_pair_equals_brute_force_over_combine(seed):
    rng = random.Random(seed)
    corr, ps, ds = _random_pools(rng, 30, 30)
    pred = Predictor(corr, first_token_after_transfer=bool(seed % 2))
    for _ in range(5):
        req = _random_request(rng)
        pp = [pred.prefill_part(req, p, CS3, 0.0) for p in ps]
        dp = [pred.decode_part(req, d) for d in ds]
        ok = [(completion_key(req, a, b), a.worker_id, b.worker_id) for a in pp for b in dp
              if pred.combine(req, a, b).ok]
        got = best_pair(req, pp, dp)
        if not ok:
            assert got is None
        else:
            assert got is not None and pred.combine(req, *got).ok
            assert (got[0].worker_id, got[1].worker_id) == min(ok)[1:]


def test_decomposed_best_pair_equals_brute_force_at_1000_by_1000():
    rng = random.Random(11)
    corr, ps, ds = _random_pools(rng, 1000, 1000)
    pred = Predictor(corr, first_token_after_transfer=False)  # the transfer tail couples into TPOT
    hits = coupled = 0
    for req in (PredictRequest(3000, 400, 0.6, 0.0035), PredictRequest(500, 50, 0.3, 0.003),
                PredictRequest(6000, 2, 1.0, 0.004)):
        pp = [pred.prefill_part(req, p, CS3, 0.0) for p in ps]
        dp = [pred.decode_part(req, d) for d in ds]
        x = np.array([p.ttft.bound_s + p.tail.bound_s for p in pp])[:, None]  # (P, 1)
        tail = np.array([p.tail.bound_s for p in pp])[:, None]
        z = np.array([d.decode.bound_s for d in dp])[None, :]  # (1, D)
        d_ok = np.array([d.fits and d.protects for d in dp])[None, :]
        p_ok = np.array([p.ttft.bound_s <= req.ttft_s for p in pp])[:, None]
        feasible = p_ok & d_ok & ((tail + z) * (1.0 / (req.max_tokens - 1)) <= req.tpot_s)  # (P, D)
        got = best_pair(req, pp, dp)
        if not feasible.any():
            assert got is None
            continue
        hits += 1
        rows = feasible[p_ok[:, 0]][:, d_ok[0]]
        coupled += int((rows.any(axis=1) & ~rows.all(axis=1)).sum())  # p fits some decode workers, not all
        cost = np.where(feasible, x + z, np.inf)
        ties = zip(*np.nonzero(cost == cost.min()))  # idle decode workers tie exactly: the lowest ids win
        i, j = min(ties, key=lambda ij: (dp[ij[1]].worker_id, pp[ij[0]].worker_id))
        assert got is not None and (got[0].worker_id, got[1].worker_id) == (pp[i].worker_id, dp[j].worker_id)
        assert pred.combine(req, *got).ok
    assert hits >= 2 and coupled > 0  # not vacuous: the transfer tail decides which pairs are feasible


@pytest.mark.parametrize("seed", range(4))
def test_the_pruned_search_finds_the_same_pair_as_best_pair(seed):
    rng = random.Random(100 + seed)
    corr, ps, ds = _random_pools(rng, 200, 200)
    pred = Predictor(corr, first_token_after_transfer=bool(seed % 2))
    found = 0
    for _ in range(8):
        req = _random_request(rng, priority=rng.randint(0, 1))
        pp = [pred.prefill_part(req, p, CS3, 0.0) for p in ps]
        first = earliest_prefill(req, pp)  # the router's rule: decode parts at its KV arrival
        want = None if first is None else best_pair(req, pp, [pred.decode_part(req, d, kv_arrival_s(first)) for d in ds])
        pi, di = _indexes(ps, ds)
        got = search_best_pair(pred, req, pi, pi.healthy, di, di.healthy, CS3, 0.0)
        assert (got is None) == (want is None)
        if want is not None:
            found += 1
            assert got == want
    assert found >= 2


@pytest.mark.parametrize("seed", range(3))
def test_the_best_effort_search_finds_what_every_workers_parts_would(seed):
    rng = random.Random(300 + seed)
    corr, ps, ds = _random_pools(rng, 120, 120)
    pred = Predictor(corr, first_token_after_transfer=bool(seed % 2))
    for _ in range(8):
        req = _random_request(rng, ttft_s=(0.05, 2.0), tpot_s=(0.001, 0.005))  # tight: many rejections
        pp = [pred.prefill_part(req, p, CS3, 0.0) for p in ps]
        want_p = min(pp, key=lambda x: (x.ttft.bound_s + x.tail.bound_s, x.worker_id))
        dp = [pred.decode_part(req, d, kv_arrival_s(want_p)) for d in ds]
        key = lambda x: (x.decode.bound_s, x.worker_id)  # noqa: E731
        want_fit = min((d for d in dp if d.fits), key=key, default=None)
        want_protect = min((d for d in dp if d.fits and d.protects), key=key, default=None)
        want_closest = want_fit or min(dp, key=key)
        pi, di = _indexes(ps, ds)
        got = best_effort_pair(pred, req, pi, pi.healthy, di, di.healthy, CS3, 0.0)
        assert got == (want_p, want_closest, want_fit, want_protect)


def test_local_prefill_ttft_is_the_step_in_flight_the_local_queue_and_the_prompt_with_no_transfer():
    corr = Corrections()
    for _ in range(corr.min_samples):  # observed exactly as predicted: factors 1 at every quantile
        corr.observe("d0", "decode", 1.0, 1.0)
        corr.observe("d0", "local_prefill", 1.0, 1.0)
        corr.observe(ttft_key("d0", REQ.ttft_s), "ttft", 1.0, 1.0)
    pred = Predictor(corr)
    running = tuple((1, 3000) for _ in range(8))  # 8 sequences running, one step left each
    st = DecodeState("d0", CS3, 8, 8 * 3000, 64, 10**6, local_busy_s=0.004, remaining=running)
    assert st.step_in_flight_s() == st.step_now_s > 0  # every sequence counted there is running
    pp, dp = pred.local_parts(REQ, st)
    q = pred.corrections.quantile
    own = prefill_time(CS3, [REQ.prompt_tokens])
    assert pp.transfer == pp.tail == Estimate(0.0, 0.0)
    assert pp.ttft.point_s == pytest.approx(0.5 * st.step_now_s + 0.004 + own)
    assert pp.ttft.bound_s == pytest.approx(q * st.step_now_s + 0.004 + own)
    assert dp.fits and dp.protects
    remote = pred.decode_part(REQ, st, kv_arrival_s(pp))
    # the running sequences stall once by the local prefills queued before it and its own, spread over their
    # steps left (1 here)
    assert dp.running_tpot.point_s == pytest.approx(remote.running_tpot.point_s + 0.004 + own)
    assert dp.decode == remote.decode  # the newcomer's own decode is the same as if its KV had arrived then


def test_local_prefill_waits_for_the_step_of_the_running_sequences_not_of_those_still_to_come():
    """The step in flight is the running sequences' alone: requests placed there whose KV has not
    arrived (a batch prompt held up in a prefill queue) are not in it, and with none running there is
    none to wait for. Chunked, the prompt rides the steps of the sequences there during its chunks: an
    overdue incoming one is not expected in that short a window, one due within it is."""
    corr = Corrections()
    for _ in range(corr.min_samples):
        corr.observe("d0", "decode", 1.0, 1.0)
        corr.observe("d0", "local_prefill", 1.0, 1.0)
        corr.observe(ttft_key("d0", REQ.ttft_s), "ttft", 1.0, 1.0)
    pred = Predictor(corr)
    running = tuple((500, 3000) for _ in range(4))
    overdue = tuple((0.0, 3000, 200, 3000) for _ in range(40))  # predicted to have arrived: held up
    alone = DecodeState("d0", CS3, 4, 4 * 3000, 64, 10**6, remaining=running, chunk_tokens=16)
    crowded = DecodeState("d0", CS3, 44, 44 * 3000, 64, 10**6, remaining=running, incoming=overdue,
                          chunk_tokens=16)
    assert crowded.step_in_flight_s() == alone.step_in_flight_s() < crowded.step_now_s
    assert pred.local_parts(REQ, crowded)[0].ttft.point_s == pytest.approx(pred.local_parts(REQ, alone)[0].ttft.point_s)
    due = tuple((1e-4, 3000, 200, 3000) for _ in range(40))  # arriving within its first chunk's step
    soon = DecodeState("d0", CS3, 44, 44 * 3000, 64, 10**6, remaining=running, incoming=due, chunk_tokens=16)
    assert pred.local_parts(REQ, soon)[0].ttft.point_s > pred.local_parts(REQ, alone)[0].ttft.point_s
    idle = DecodeState("d0", CS3, 40, 40 * 3000, 64, 10**6, incoming=overdue)
    assert idle.step_in_flight_s() == 0.0 < idle.step_now_s


def test_local_prefill_needs_kv_room_now_and_protects_the_running_sequences():
    pred = Predictor()
    need = REQ.prompt_tokens + REQ.max_tokens
    assert not pred.local_parts(REQ, dstate(8, free=need - 1))[1].fits
    assert pred.local_parts(REQ, dstate(8, free=need))[1].fits
    remaining = tuple((100, 3000) for _ in range(8))  # the stall is spread over 100 steps each
    st = DecodeState("d0", CS3, 8, 8 * 3000, 64, 10**6, remaining=remaining)
    _, dp = pred.local_parts(REQ, st)
    spread = prefill_time(CS3, [REQ.prompt_tokens]) / 100
    assert dp.running_tpot.point_s == pytest.approx(pred.decode_part(REQ, st).running_tpot.point_s + spread)
    bound = dp.running_tpot.bound_s
    tight = DecodeState("d0", CS3, 8, 8 * 3000, 64, 10**6, targets(bound * 0.999, 100), remaining=remaining)
    assert not pred.local_parts(REQ, tight)[1].protects
    assert pred.decode_part(REQ, tight).protects  # without the stall the same worker takes it
    full = DecodeState("d0", CS3, 64, 64 * 3000, 64, 10**6, targets(1e-9))
    assert pred.decode_part(REQ, full).protects and not pred.local_parts(REQ, full)[1].protects


def test_local_room_counts_the_kv_due_before_its_last_token_and_not_what_comes_later_or_is_overdue():
    """A local prefill holds prompt + max_tokens of KV from its placement to its last token. A remote
    request placed there reserves its own when its KV arrives: before that end it competes, after it
    finds the room given back; one already overdue (eta 0) is held up elsewhere, when is not known."""
    pred = Predictor()
    need = REQ.prompt_tokens + REQ.max_tokens
    pp, dp = pred.local_parts(REQ, dstate(0, free=need))
    end = completion_key(REQ, pp, dp)
    def fits(*incoming):  # each (seconds until its KV arrives, KV tokens it will reserve)
        st = DecodeState("d0", CS3, len(incoming), 0, 64, need + 100,
                         incoming=tuple(sorted((eta, kv, 10, kv + 10) for eta, kv in incoming)))
        return pred.local_parts(REQ, st)[1].fits
    assert fits() and fits((end * 0.5, 100))  # what is left after its own reservation still fits
    assert not fits((end * 0.5, 101))  # arrives while it holds its blocks: no room for both
    assert fits((end * 2, 5000))  # arrives once it is done
    assert fits((0.0, 5000))  # overdue: not held for
    assert not fits((0.0, 5000), (end * 0.5, 101))
    st = DecodeState("d0", CS3, 1, 0, 64, need, incoming=((end * 2, 5000, 10, 5010),))
    assert st.has_room_until(need, end) and not st.has_room_until(need, end * 3)
    assert not st.has_room_now(need)  # the remote path's own check still counts every reservation


def test_a_local_prefills_stall_must_fit_the_shortest_sequence_of_each_target():
    """A stall of S seconds adds S / n to the TPOT of a sequence of n steps: a short output cannot take
    what a long one can, and each target is checked against its own shortest sequence."""
    pred = Predictor()
    remaining = tuple((100, 3000) for _ in range(8))
    base = DecodeState("d0", CS3, 8, 8 * 3000, 64, 10**6, remaining=remaining)
    _, dp = pred.local_parts(REQ, base)
    per_100 = dp.running_tpot.bound_s * 1.001  # just absorbs the stall over 100 steps
    def local_protects(tpot_targets):
        st = DecodeState("d0", CS3, 8, 8 * 3000, 64, 10**6, tpot_targets, remaining=remaining)
        return pred.local_parts(REQ, st)[1].protects
    assert local_protects(((per_100, 100),))
    assert not local_protects(((per_100, 4),))  # a 5-token output with the same target
    assert local_protects(((per_100, 100), (1.0, 4)))  # the short one has a loose target
    assert not local_protects(((per_100 * 0.999, 100), (1.0, 4)))
    # the TPOT reported for them still spreads the stall over their mean steps left
    short = DecodeState("d0", CS3, 8, 8 * 3000, 64, 10**6, ((per_100, 4),), remaining=remaining)
    assert pred.local_parts(REQ, short)[1].running_tpot == dp.running_tpot
    assert pred.decode_part(REQ, short).protects  # a remote prefill stalls nobody
    # the local prefills queued before it stall them too: together they must fit
    own = prefill_time(CS3, [REQ.prompt_tokens])
    queued = DecodeState("d0", CS3, 8, 8 * 3000, 64, 10**6, ((per_100, 100),), remaining=remaining, local_busy_s=own)
    assert not pred.local_parts(REQ, queued)[1].protects


def test_fewest_steps_keeps_the_shortest_sequence_of_each_target():
    assert fewest_steps([]) == ()
    assert fewest_steps([(0.05, 30), (0.02, 100), (0.05, 4), (0.02, 7), (0.05, 9)]) == ((0.02, 7), (0.05, 4))


def test_work_arriving_with_tighter_targets_lengthens_the_queue_wait_of_looser_ones_only():
    pred, q = Predictor(), queue(6)
    loose = PredictRequest(2000, 200, ttft_s=20.0, tpot_s=0.05)
    calm, busy = pstate(q), PrefillState("p0", TRN, 4096, 8, tuple(q), 0.0, arrivals=((1.5, 0.5, 0.5),))
    base, got = pred.prefill_part(loose, calm, CS3, 0.0), pred.prefill_part(loose, busy, CS3, 0.0)
    assert base.queue_wait.point_s > 0
    assert got.queue_wait.point_s == pytest.approx(2 * base.queue_wait.point_s)  # W0 / (1 - 0.5), within 18.5 s
    assert got.prefill == base.prefill and got.ttft.point_s > base.ttft.point_s
    # a 2 s target is only 0.5 s looser: what arrives in the first 0.5 s of its wait overtakes it
    assert pred.prefill_part(REQ, busy, CS3, 0.0).queue_wait.point_s == pytest.approx(
        pred.prefill_part(REQ, calm, CS3, 0.0).queue_wait.point_s + 0.5 * 0.5)
    # ... and only when it waits at all
    assert pred.prefill_part(loose, PrefillState("p0", TRN, 4096, 8, (), 0.0, arrivals=((1.5, 0.5, 0.5),)), CS3,
                             0.0) == pred.prefill_part(loose, pstate(), CS3, 0.0)


def test_the_tpot_correction_adds_seconds_per_step_to_the_decode_side_and_is_observed_against_the_parts():
    corr = Corrections()
    cold = corr.offsets("d0", "tpot")
    assert (cold.point_s, cold.bound_s) == (0.0, 0.0)  # unlearned: none, the parts' bounds carry their own prior
    with pytest.raises(ValueError, match="offset"):
        corr.factors("d0", "tpot")
    base = Predictor(corr).decode_part(REQ, dstate(8))
    steps = REQ.max_tokens - 1
    for extra in (0.01, 0.02, 0.02, 0.02, 0.03):  # TPOTs seen 10-30 ms a step above the parts (stalls between steps)
        corr.observe("d0", "tpot", 0.1 + extra, 0.1)
    got = Predictor(corr).decode_part(REQ, dstate(8))
    assert got.step.point_s == pytest.approx(base.step.point_s + 0.02)  # the median difference
    assert got.step.bound_s == pytest.approx(base.step.bound_s + 0.026)  # its 0.9-quantile
    assert got.decode.point_s == pytest.approx(base.decode.point_s + steps * 0.02)
    assert got.running_tpot.point_s == pytest.approx(base.running_tpot.point_s + 0.02)
    assert got.wait == base.wait  # once per request: not per step
    pp = Predictor(corr).prefill_part(REQ, pstate(), CS3, 0.0)
    pair = Predictor.combine(REQ, pp, got)
    # what the correction observes against (with the time the steps took): the wait before the first step
    assert pair.tpot_wait_s == pytest.approx(pp.tail.point_s + base.wait.point_s)
    assert pair.tpot.point_s == pytest.approx((pair.tpot_wait_s + steps * (base.step.point_s + 0.02)) / steps)
    assert Predictor(corr).decode_part(REQ, dstate(8, wid="d1")).decode == base.decode  # another worker: its own


def test_sequences_still_to_be_placed_join_a_newcomers_steps():
    pred, base = Predictor(), dstate(8)
    # 40 sequences a second of 99 steps each: past one life (99 steps at today's pace) 40 x life run beside it
    busy = DecodeState("d0", CS3, 8, 8 * 3000, 64, 10**6, arriving=(40.0, 99.0))
    life = 99 * base.step_now_s
    assert busy.sharing(0.0, 1.0) > base.sharing(0.0, 1.0)
    assert busy.sharing(0.0, 0.0) == base.sharing(0.0, 0.0) == 8  # none has joined yet at the start
    assert busy.sharing(life, 0.0) == pytest.approx(8 + 40 * life)
    assert busy.sharing(0.0, 2 * life) == pytest.approx(8 + 40 * life * 0.75)  # the ramp, then steady
    crowded = DecodeState("d0", CS3, 8, 8 * 3000, 64, 10**6, arriving=(10**4, 99.0))
    assert crowded.sharing(life, 0.0) == 63.0  # max_batch - 1
    assert pred.decode_part(REQ, busy).step.point_s > pred.decode_part(REQ, base).step.point_s
    assert pred.decode_part(REQ, DecodeState("d0", CS3, 8, 8 * 3000, 64, 10**6, arriving=(0.0, 0.0))) == (
        pred.decode_part(REQ, base))
    for bad in ((-1.0, 10.0), (1.0, math.inf), (1.0, math.nan), (1.0,)):
        with pytest.raises(ValueError, match="arriving"):
            DecodeState("d0", CS3, 8, 8 * 3000, 64, 10**6, arriving=bad)


def test_a_stall_learned_on_short_steps_does_not_multiply_longer_ones():
    # the first requests on a worker saw TPOT 3x their parts: 20 ms steps, 40 ms of stalls between them. A
    # batch 8 times larger has longer steps, but the stalls between them are the same seconds
    corr = Corrections()
    for _ in range(corr.min_samples):
        corr.observe("d0", "tpot", 0.06, 0.02)
    small, large = dstate(2), dstate(64)
    base = Predictor(Corrections()).decode_part(REQ, large)
    got = Predictor(corr).decode_part(REQ, large)
    assert got.step.point_s == pytest.approx(base.step.point_s + 0.04)
    assert got.running_tpot.bound_s == pytest.approx(base.running_tpot.bound_s + 0.04)
    assert Predictor(corr).decode_part(REQ, small).step.point_s == pytest.approx(
        Predictor(Corrections()).decode_part(REQ, small).step.point_s + 0.04)


def test_the_sharing_correction_scales_the_newcomers_forecast_steps_and_not_the_running_ones():
    corr = Corrections(0.9, window=8, min_samples=5)
    base = Predictor(corr).decode_part(REQ, dstate(8))
    assert corr.factors("d0", "sharing") == Factors(1.0, 1.0)  # its prior: neutral (the decode prior bounds it)
    for measured in (0.7, 0.75, 0.8, 0.8, 0.85):  # mean steps measured below their forecast
        corr.observe("d0", "sharing", measured, 1.0)
    got = Predictor(corr).decode_part(REQ, dstate(8))
    assert got.step.point_s == pytest.approx(base.step.point_s * 0.8)  # the median
    assert got.step.bound_s == pytest.approx(base.step.bound_s * 0.83)  # the 0.9-quantile
    assert got.decode.point_s == pytest.approx(base.wait.point_s + (REQ.max_tokens - 1) * got.step.point_s)
    # today's batch plus one is no forecast: what the running sequences get, and their protection, stay
    assert (got.running_tpot, got.protects, got.tightest, got.wait) == (
        base.running_tpot, base.protects, base.tightest, base.wait)
    assert got.step_model_s == pytest.approx(base.step_model_s) == pytest.approx(base.step.point_s)  # before itself


def test_a_finished_decode_teaches_sharing_its_mean_step_and_tpot_what_lies_outside_its_steps():
    corr = Corrections(0.9, window=8, min_samples=1)
    # 10 gaps: 0.9 s of steps, 0.1 s predicted before the first, a TPOT of 0.12 s; forecast 0.1 s a step
    corr.observe_decode("d0", 0.12, 0.9, 10, 0.1, 0.1, sharing=True)
    assert corr.factors("d0", "sharing").point == pytest.approx(0.9)  # 0.09 s measured a step
    assert corr.offsets("d0", "tpot").point_s == pytest.approx(0.12 - (0.1 + 0.9) / 10)
    corr.observe_decode("d1", 0.12, 0.9, 10, 0.1, 0.1, sharing=False)  # a forecast made on a young meter
    assert corr.samples("d1", "sharing") == 0 and corr.samples("d1", "tpot") == 1


def test_a_negative_tpot_offset_never_makes_a_step_negative():
    corr = Corrections()
    for _ in range(corr.min_samples):  # observed far faster than predicted, on much longer parts than today's
        corr.observe("d0", "tpot", 0.0, 10.0)
    got = Predictor(corr).decode_part(REQ, dstate(8))
    assert got.step.point_s == 0.0 and got.step.bound_s == 0.0 and got.running_tpot.point_s >= 0.0


def test_whole_local_prefills_queued_at_its_arrival_hold_up_a_newcomers_first_step():
    pred, queued = Predictor(), DecodeState("d0", CS3, 8, 8 * 3000, 64, 10**6, local_busy_s=0.3)
    base = pred.decode_part(REQ, dstate(8), arrival_s=0.1)
    got = pred.decode_part(REQ, queued, arrival_s=0.1)  # 0.2 s of them are left when its KV arrives
    assert got.wait.point_s == pytest.approx(base.wait.point_s + 0.2)
    assert pred.decode_part(REQ, queued, arrival_s=0.5).wait == pred.decode_part(REQ, dstate(8), arrival_s=0.5).wait
    chunked = DecodeState("d0", CS3, 8, 8 * 3000, 64, 10**6, local_busy_s=0.3, chunk_tokens=16)
    assert pred.decode_part(REQ, chunked, arrival_s=0.1).wait == base.wait  # chunks ride the steps instead


def test_chunked_local_prefill_rides_the_steps_after_the_local_queue_and_holds_them_by_one_chunk():
    corr = Corrections()
    for _ in range(corr.min_samples):  # observed exactly as predicted: factors 1 at every quantile
        for phase in ("decode", "local_prefill"):
            corr.observe("d0", phase, 1.0, 1.0)
        corr.observe(ttft_key("d0", REQ.ttft_s), "ttft", 1.0, 1.0)
    pred = Predictor(corr)
    running = tuple((1000, 3000) for _ in range(8))  # decoding past its chunks
    st = DecodeState("d0", CS3, 8, 8 * 3000, 64, 10**6, chunk_tokens=16, local_tokens=40, remaining=running)
    pp, dp = pred.local_parts(REQ, st)
    chunk = chunk_step_time(CS3, 16)
    assert 0 < chunk < prefill_time(CS3, [16])  # the step already pays the pass's fixed latency
    step = st.token_step(8, 8 * 3000) + chunk
    # 40 tokens queued before it take 3 steps, its own 2000 take 125, each carrying a chunk
    assert pp.ttft.point_s == pytest.approx(0.5 * st.step_now_s + 3 * step + 125 * step)
    assert pp.transfer == pp.tail == Estimate(0.0, 0.0)
    remote = pred.decode_part(REQ, st, kv_arrival_s(pp))
    assert dp.running_tpot.point_s == pytest.approx(remote.running_tpot.point_s + chunk)  # not the whole prefill
    assert dp.decode == remote.decode
    tight = DecodeState("d0", CS3, 8, 8 * 3000, 64, 10**6, targets(dp.running_tpot.bound_s * 0.999),
                        chunk_tokens=16)
    assert not pred.local_parts(REQ, tight)[1].protects and pred.decode_part(REQ, tight).protects
    # nothing decoding there: nobody to hold up, so the prompt runs whole, as without chunks
    idle = DecodeState("d0", CS3, 0, 0, 64, 10**6, chunk_tokens=16)
    whole = DecodeState("d0", CS3, 0, 0, 64, 10**6)
    assert pred.local_parts(REQ, idle) == pred.local_parts(REQ, whole)
    # nothing decoding yet, but a local prompt placed before it (its sequence incoming, 300 steps): that
    # one's sequence joins once prefilled, and this prompt's chunks ride its steps
    ahead = ((0.004, 0, 300, 3000),)
    queued = DecodeState("d0", CS3, 1, 1000, 64, 10**6, incoming=ahead, chunk_tokens=16, local_tokens=1000,
                         local_busy_s=prefill_time(CS3, [1000]))
    unchunked = DecodeState("d0", CS3, 1, 1000, 64, 10**6, incoming=ahead, local_tokens=1000,
                            local_busy_s=prefill_time(CS3, [1000]))
    rides, runs_whole = pred.local_parts(REQ, queued)[0], pred.local_parts(REQ, unchunked)[0]
    assert rides.ttft.point_s > runs_whole.ttft.point_s  # 16 tokens a step is slower than one whole pass
    with pytest.raises(ValueError, match="chunk_tokens"):
        DecodeState("d0", CS3, 8, 8 * 3000, 64, 10**6, chunk_tokens=-1)


def test_stall_fraction_stretches_every_step():
    base, stalled = dstate(8), DecodeState("d0", CS3, 8, 8 * 3000, 64, 10**6, stall_fraction=0.25)
    assert stalled.step_now_s == pytest.approx(base.step_now_s / 0.75)
    with pytest.raises(ValueError, match="stall_fraction"):
        DecodeState("d0", CS3, 8, 8 * 3000, 64, 10**6, stall_fraction=1.0)


def test_the_newcomer_shares_its_steps_only_with_the_sequences_that_overlap_it():
    base = dstate(4)
    step = base.step_now_s
    # 2 running (10 and 1000 steps left), 1 arriving after 500 steps for 100 steps, 1 waiting: over the
    # newcomer's 1000 steps from now they overlap it for 10, 1000, 100 and 1000 steps
    st = DecodeState("d0", CS3, 4, 4 * 3000, 64, 10**6, remaining=((10, 3000), (1000, 3000)),
                     incoming=((500 * step, 0, 100, 3000),))
    assert st.step_now_s == pytest.approx(step)
    assert st.sharing(0.0, 1000 * step) == pytest.approx((10 + 1000 + 100 + 1000) / 1000)
    assert st.sharing(0.0, 0.0) == 3  # at the start: both running and the waiting one
    assert dstate(80, max_batch=64).sharing(0.0, 1.0) == 63  # never more than a full batch beside it
    pred = Predictor()
    req = PredictRequest(2000, 1001, 2.0, 0.02)
    assert pred.decode_part(req, st).step.point_s < pred.decode_part(req, base).step.point_s
