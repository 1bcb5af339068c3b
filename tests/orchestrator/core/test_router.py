import pytest

from orchestrator.core.sla import SLATarget
from orchestrator.core.router import DecodeView, Placement, PrefillView, Rejection, RouteRequest, Router

SLA = SLATarget(ttft_ms=1000, tpot_ms=50)


def pf(wid, queued=0, rate=1000.0, healthy=True):
    return PrefillView(wid, queued, rate, healthy)


def dc(wid, active=0, free=1000, total=1000, step=20.0, healthy=True):
    return DecodeView(wid, active, 64, free, total, step, healthy)


def req(prompt=100, out=50, sla=SLA):
    return RouteRequest("r", prompt, out, sla)


def test_round_robin_cycles():
    r = Router("round_robin")
    got = [r.place(req(), [pf("p0"), pf("p1")], [dc("d0"), dc("d1")], 0.0) for _ in range(4)]
    assert [(p.prefill_worker, p.decode_worker) for p in got] == [("p0", "d0"), ("p1", "d1")] * 2


def test_least_loaded_picks_shortest_queue_and_emptiest_decode():
    r = Router("least_loaded")
    p = r.place(req(), [pf("p0", queued=5000), pf("p1", queued=10)], [dc("d0", active=10), dc("d1", active=2)], 0.0)
    assert isinstance(p, Placement) and (p.prefill_worker, p.decode_worker) == ("p1", "d1")


def test_sla_policy_rejects_early_naming_the_target():
    r = Router("sla")
    slow = r.place(req(prompt=2000), [pf("p0", queued=0, rate=1000)], [dc("d0", free=10000, total=10000)], 0.0)
    assert isinstance(slow, Rejection) and "TTFT" in slow.reason
    busy = r.place(req(), [pf("p0")], [dc("d0", step=80.0)], 0.0)
    assert isinstance(busy, Rejection) and "TPOT" in busy.reason
    ok = r.place(req(), [pf("p0")], [dc("d0", step=80.0), dc("d1", step=30.0)], 0.0)
    assert isinstance(ok, Placement) and ok.decode_worker == "d1"


def test_rejects_what_can_never_fit_and_skips_unhealthy():
    r = Router("least_loaded")
    too_big = r.place(req(prompt=900, out=200), [pf("p0")], [dc("d0", total=1000)], 0.0)
    assert isinstance(too_big, Rejection) and too_big.code == "RESOURCE_EXHAUSTED"
    none = r.place(req(), [pf("p0", healthy=False)], [dc("d0")], 0.0)
    assert isinstance(none, Rejection) and none.code == "UNAVAILABLE"
    p = r.place(req(), [pf("p0")], [dc("d0", healthy=False), dc("d1", active=50)], 0.0)
    assert p.decode_worker == "d1"


def test_unknown_policy_is_named():
    with pytest.raises(ValueError, match="policy"):
        Router("fastest")
