"""The router's pruned searches find the exhaustive answer on the simulator's own states (running
sequences finishing, requests incoming, local prefills): the states the bench's random views lack."""
import math

import numpy as np

from hardware.perf import make_deployment
from hardware.profiles import get_profile
from model.specs import get_spec
from orchestrator.core import router as router_module
from orchestrator.core.predictor import best_pair, completion_key, earliest_prefill, kv_arrival_s
from orchestrator.core.request import SLATarget
from orchestrator.simulator.engine import PoolSetup, SimConfig, Simulator
from orchestrator.simulator.workload import poisson


def _pair(x):
    return None if x is None else (x[0].worker_id, x[1].worker_id)


def _exhaustive_pair(pred, req, pidx, pmask, didx, dmask, dst, now):
    pp = [pred.prefill_part(req, pidx.states[i], dst, now) for i in np.flatnonzero(pmask)]
    first = earliest_prefill(req, pp)
    if first is None:
        return None
    return best_pair(req, pp, [pred.decode_part(req, didx.states[i], kv_arrival_s(first)) for i in np.flatnonzero(dmask)])


def _exhaustive_local(pred, req, didx, dmask, beat=math.inf):
    best, best_key = None, (beat, "")
    for i in np.flatnonzero(dmask):
        st = didx.states[i]
        if st.free_kv_tokens >= req.prompt_tokens + req.max_tokens:
            pp, dp = pred.local_parts(req, st)
            if pred.combine(req, pp, dp).ok and (completion_key(req, pp, dp), st.worker_id) < best_key:
                best, best_key = (pp, dp), (completion_key(req, pp, dp), st.worker_id)
    return best


def test_every_search_in_a_loaded_simulation_finds_the_exhaustive_answer(monkeypatch):
    seen = {"pair": 0, "local": 0, "finishing": 0}
    search, local = router_module.search_best_pair, router_module.best_local

    def checked_search(pred, req, pidx, pmask, didx, dmask, dst, now):
        got = search(pred, req, pidx, pmask, didx, dmask, dst, now)
        assert _pair(got) == _pair(_exhaustive_pair(pred, req, pidx, pmask, didx, dmask, dst, now))
        seen["pair"] += 1
        seen["finishing"] += any(st.remaining for st in didx.states)
        return got

    def checked_local(pred, req, didx, dmask, beat=math.inf):
        got = local(pred, req, didx, dmask, beat)
        assert _pair(got) == _pair(_exhaustive_local(pred, req, didx, dmask, beat))
        seen["local"] += 1
        return got

    monkeypatch.setattr(router_module, "search_best_pair", checked_search)
    monkeypatch.setattr(router_module, "best_local", checked_local)
    m = get_spec("llama-3.1-70b")
    cfg = SimConfig(PoolSetup(make_deployment(m, get_profile("trn2.48xlarge"), tp=64), 2, 8),
                    PoolSetup(make_deployment(m, get_profile("cs3"), systems=4), 2, 64), SLATarget(1500, 15),
                    local_prefill_max_tokens=2048)
    reqs = poisson(40.0, 500, [(200, 300), (1500, 200), (6000, 20), (100, 1), (900, 800)], seed=3)
    Simulator(cfg).run(reqs)
    assert seen["pair"] > 300 and seen["local"] > 100 and seen["finishing"] > 100  # not vacuous
