"""The router's rules on hand-built views of a Llama-3.1-70B Trn2 prefill pool and CS-3 decode pool."""
import math

import pytest
from hypothesis import given, settings, strategies as st

from hardware.perf import make_deployment
from hardware.profiles import get_profile
from model.specs import get_spec
from orchestrator.core.correction import Corrections
from orchestrator.core.predictor import DecodeState, PredictRequest, Predictor, PrefillState
from orchestrator.core.queueplan import QueuedPrompt
from orchestrator.core.router import (POLICIES, REJECTION_KINDS, DecodeView, Placement, PrefillView, Rejection,
                                      RouteRequest, Router)
from orchestrator.core.sla import SLATarget
from tests.orchestrator.core.test_predictor import targets

MODEL = get_spec("llama-3.1-70b")
TRN = make_deployment(MODEL, get_profile("trn2.48xlarge"), tp=64)
CS3 = make_deployment(MODEL, get_profile("cs3@2024-08"), systems=4)  # launch: one pass per token
SLA = SLATarget(ttft_ms=2000, tpot_ms=20)
KV = 2_000_000  # tokens of KV per decode worker


def pf(wid, queued=0, tokens=2000, healthy=True, busy_until=0.0):
    queue = tuple(QueuedPrompt(tokens, -1.0 - i, 0, 1.0) for i in range(queued))
    return PrefillView(PrefillState(wid, TRN, 8192, 8, queue, busy_until), healthy=healthy)


def dc(wid, batch=4, ctx=3000, free=KV, tightest=math.inf, healthy=True, total=KV):
    return DecodeView(DecodeState(wid, CS3, batch, batch * ctx, 64, free, targets(tightest)), total, 64, healthy)


def req(prompt=2000, out=200, sla=SLA):
    return RouteRequest("r", prompt, out, sla)


def warm(policy="sla", **kw) -> Router:
    """A router whose corrections have seen every test worker (ratio 1): it rejects on its predictions."""
    corr = Corrections()
    for i in range(6):
        for _ in range(corr.min_samples):
            corr.observe(f"p{i}", "prefill", 1.0, 1.0)
            corr.observe(f"d{i}", "decode", 1.0, 1.0)
    return Router(policy, Predictor(corr), **kw)


def test_round_robin_cycles():
    r = Router("round_robin")
    got = [r.place(req(), [pf("p0"), pf("p1")], [dc("d0"), dc("d1")], 0.0) for _ in range(4)]
    assert [(p.prefill_worker, p.decode_worker) for p in got] == [("p0", "d0"), ("p1", "d1")] * 2


def test_least_loaded_picks_shortest_queue_and_emptiest_decode():
    r = Router("least_loaded")
    p = r.place(req(), [pf("p0", queued=5), pf("p1", queued=1)], [dc("d0", batch=40), dc("d1", batch=2)], 0.0)
    assert isinstance(p, Placement) and (p.prefill_worker, p.decode_worker) == ("p1", "d1")


def test_cost_counts_kv_blocks_in_use_not_the_batch():
    r = Router("cost")
    few_long = dc("d0", batch=4, ctx=100_000, free=KV - 400_000)  # few sequences, many blocks
    many_short = dc("d1", batch=30, ctx=500, free=KV - 15_000)
    p = r.place(req(), [pf("p0", queued=3), pf("p1", queued=2)], [few_long, many_short], 0.0)
    assert (p.prefill_worker, p.decode_worker) == ("p1", "d1")
    assert Router("least_loaded").place(req(), [pf("p0")], [few_long, many_short], 0.0).decode_worker == "d0"


def test_every_policy_reports_the_predictors_estimate_for_its_pair():
    for policy in POLICIES:
        p = Router(policy).place(req(), [pf("p0")], [dc("d0")], 0.0)
        assert isinstance(p, Placement), policy
        assert 0 < p.predicted_ttft_ms <= p.ttft_bound_ms and 0 < p.predicted_tpot_ms <= p.tpot_bound_ms


def test_sla_meets_the_targets_it_admits_and_picks_the_pair_that_can():
    r = warm("sla")
    p = r.place(req(), [pf("p0", queued=6), pf("p1")], [dc("d0", batch=60), dc("d1")], 0.0)
    assert isinstance(p, Placement) and (p.prefill_worker, p.decode_worker) == ("p1", "d1")
    assert p.ttft_bound_ms <= SLA.ttft_ms and p.tpot_bound_ms <= SLA.tpot_ms


def test_sla_rejects_at_once_naming_the_predictions_against_the_targets():
    r = warm("sla")
    late = r.place(req(), [pf("p0", queued=8, busy_until=1.5)], [dc("d0")], 0.0)
    assert isinstance(late, Rejection) and late.kind == "ttft" and late.code == "RESOURCE_EXHAUSTED"
    assert "predicted TTFT" in late.reason and "2000 ms" in late.reason
    slow = r.place(req(sla=SLATarget(2000, 1.0)), [pf("p0")], [dc("d0")], 0.0)
    assert isinstance(slow, Rejection) and slow.kind == "tpot" and "TPOT" in slow.reason


def test_a_ttft_target_below_the_floor_names_the_floor():
    got = warm("sla").place(req(sla=SLATarget(0.001, 20)), [pf("p0")], [dc("d0")], 0.0)
    assert isinstance(got, Rejection) and got.kind == "below_floor" and "floor" in got.reason
    assert "idle prefill worker" in got.reason


def test_sla_protects_the_tpot_of_sequences_already_decoding():
    r = warm("sla")
    with_it = r.predictor.decode_part(PredictRequest.from_sla(2000, 200, SLA), dc("d0", batch=20).state)
    tight = dc("d0", batch=20, tightest=with_it.running_tpot.bound_s * 0.999)  # one more sequence breaks it
    loose = dc("d1", batch=20, ctx=3100)
    assert r.place(req(), [pf("p0")], [tight, loose], 0.0).decode_worker == "d1"
    alone = r.place(req(), [pf("p0")], [tight], 0.0)
    assert isinstance(alone, Rejection) and alone.kind == "running_tpot"
    # it names the sequence it protects: its target and what it would get (the bound just over it)
    target_ms = with_it.running_tpot.bound_s * 0.999 * 1e3
    assert f"the shortest sequence of the {target_ms:.4g} ms target there would get " in alone.reason
    got_ms = float(alone.reason.split(" would get ")[1].split(" ms")[0])
    assert target_ms < got_ms <= target_ms * 1.01  # printed to 4 digits
    assert isinstance(r.place(req(), [pf("p0")], [dc("d0", batch=20, tightest=with_it.running_tpot.bound_s)], 0.0),
                      Placement)


def test_full_workers_and_bad_pools_are_named():
    r = warm("sla")
    full = r.place(req(), [pf("p0")], [dc("d0", batch=64)], 0.0)
    assert isinstance(full, Rejection) and full.kind == "kv_full"
    huge = r.place(req(prompt=900, out=200), [pf("p0")], [dc("d0", total=1000, free=1000)], 0.0)
    assert isinstance(huge, Rejection) and huge.kind == "kv_capacity" and "1100 tokens" in huge.reason
    none = r.place(req(), [pf("p0", healthy=False)], [dc("d0")], 0.0)
    assert isinstance(none, Rejection) and none.code == "UNAVAILABLE"
    assert {x.kind for x in (full, huge)} <= set(REJECTION_KINDS)


def test_without_rejection_it_places_on_the_best_effort_pair():
    views = ([pf("p0", queued=8, busy_until=1.5)], [dc("d0")])
    assert isinstance(warm("sla").place(req(), *views, 0.0), Rejection)
    p = warm("sla", reject=False).place(req(), *views, 0.0)
    assert isinstance(p, Placement) and p.ttft_bound_ms > SLA.ttft_ms


def test_a_cold_router_places_what_a_warm_one_rejects_so_its_corrections_can_learn():
    views = ([pf("p0", queued=8, busy_until=1.5)], [dc("d0")])
    assert isinstance(warm().place(req(), *views, 0.0), Rejection)
    assert isinstance(warm().place(req(sla=SLATarget(0.001, 20)), *views, 0.0), Rejection)
    cold = Router("sla")  # nothing observed yet: the prior may be far off (an unmeasured host)
    assert isinstance(cold.place(req(), *views, 0.0), Placement)
    assert isinstance(cold.place(req(sla=SLATarget(0.001, 20)), *views, 0.0), Placement)


def test_unknown_policy_is_named():
    with pytest.raises(ValueError, match="policy"):
        Router("fastest")


@st.composite
def pools(draw):
    n_p, n_d = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    prefill = [pf(f"p{i}", draw(st.integers(0, 6)), draw(st.integers(100, 6000)), draw(st.booleans()),
                  draw(st.floats(0.0, 2.0))) for i in range(n_p)]
    decode = []
    for i in range(n_d):
        batch = draw(st.integers(0, 64))
        free = draw(st.sampled_from([0, 1000, 5000, KV]))
        decode.append(dc(f"d{i}", batch, draw(st.integers(100, 8000)), free, draw(st.sampled_from([math.inf, 0.02, 0.05])),
                         draw(st.booleans())))
    return prefill, decode


@settings(max_examples=150, deadline=None)
@given(pools(), st.integers(1, 6000), st.integers(1, 800), st.sampled_from(POLICIES), st.randoms(),
       st.sampled_from([0, 1000, 6000]))
def test_never_places_on_an_unhealthy_or_full_worker_and_ignores_view_order(views, prompt, out, policy, rnd, local):
    prefill, decode = views
    r = req(prompt, out, SLATarget(3000, 30))
    got = warm(policy, local_prefill_max_tokens=local).place(r, prefill, decode, 0.0)
    if isinstance(got, Placement):
        d = next(v for v in decode if v.worker_id == got.decode_worker)
        if got.local:
            assert policy == "sla" and prompt <= local and got.prefill_worker == got.decode_worker
        else:
            assert next(v for v in prefill if v.worker_id == got.prefill_worker).healthy
        assert d.healthy and d.total_kv_tokens >= prompt + out
        if policy == "sla":
            assert d.state.free_kv_tokens >= prompt + out and d.state.batch < d.state.max_batch
            assert got.ttft_bound_ms <= 3000 and got.tpot_bound_ms <= 30
    if policy != "round_robin":  # its cursor walks the views in order, by design
        rnd.shuffle(prefill)
        rnd.shuffle(decode)
        assert warm(policy, local_prefill_max_tokens=local).place(r, prefill, decode, 0.0) == got


def warm_local(max_tokens=4096) -> Router:
    return warm(local_prefill_max_tokens=max_tokens)


def test_local_prefill_is_chosen_only_when_it_completes_sooner_and_within_the_limit():
    busy = [pf("p0", queued=8)]  # a deep prefill queue: the disaggregated pair is slow
    d = [dc("d0", batch=8), dc("d1", batch=30)]
    got = warm_local().place(req(), busy, d, 0.0)
    assert isinstance(got, Placement) and got.local and got.prefill_worker == got.decode_worker == "d0"
    assert not warm().place(req(), busy, d, 0.0).local  # off unless configured
    assert not warm_local(max_tokens=1999).place(req(), busy, d, 0.0).local  # a longer prompt than allowed
    remote = warm().place(req(), busy, d, 0.0)
    assert got.ttft_bound_ms < remote.ttft_bound_ms


def test_local_prefill_is_not_chosen_when_its_stall_breaks_a_running_sequences_target():
    r = warm_local()
    pred = r.predictor
    st = dc("d0", batch=8).state
    _, local = pred.local_parts(PredictRequest(2000, 200, 2.0, 0.02), st)
    tight = dc("d0", batch=8, tightest=local.running_tpot.bound_s * 0.999)
    got = r.place(req(), [pf("p0", queued=8)], [tight], 0.0)
    assert isinstance(got, Placement) and not got.local  # the disaggregated pair still meets the SLA


def test_a_rejection_says_why_the_local_prefill_would_not_do_either():
    r = warm_local()
    _, local = r.predictor.local_parts(PredictRequest(2000, 200, 2.0, 0.02), dc("d0", batch=8).state)
    deep = [pf("p0", queued=40)]  # the disaggregated pair misses the TTFT target
    stalled = r.place(req(), deep, [dc("d0", batch=8, tightest=local.running_tpot.bound_s * 0.999)], 0.0)
    assert isinstance(stalled, Rejection) and stalled.kind == "ttft"
    assert stalled.reason.endswith("; prefilled on d0 itself: it would push sequences decoding there past "
                                   "their TPOT target")
    slow = r.place(req(sla=SLATarget(ttft_ms=2000, tpot_ms=0.5)), deep, [dc("d0", batch=8)], 0.0)
    assert isinstance(slow, Rejection) and "prefilled on d0 itself: predicted TTFT " in slow.reason
    assert slow.reason.endswith("against 2000 ms, 0.5 ms")
    assert "prefilled on" not in warm().place(req(), deep, [dc("d0", batch=8)], 0.0).reason  # local off


def test_local_prefill_lowers_the_floor_for_short_prompts():
    tight = req(sla=SLATarget(ttft_ms=60, tpot_ms=20))  # below Trn2's 120 ms for 2000 tokens, above CS-3's
    assert warm().place(tight, [pf("p0")], [dc("d0")], 0.0).kind == "below_floor"
    got = warm_local().place(tight, [pf("p0")], [dc("d0")], 0.0)
    assert isinstance(got, Placement) and got.local


def test_local_prefill_waits_until_the_prefill_pool_is_learned():
    """A cold prefill pool gets the work (so it is observed, and the router can learn to reject)."""
    busy, d = [pf("p0", queued=8)], [dc("d0", batch=8)]
    cold = Router("sla", local_prefill_max_tokens=4096)
    assert not cold.place(req(), busy, d, 0.0).local
    assert warm_local().place(req(), busy, d, 0.0).local
