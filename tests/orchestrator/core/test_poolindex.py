"""The pools' arrays (orchestrator/core/poolindex.py): their floors are lower bounds of the exact parts,
the pruned search over them finds `best_pair`'s answer, and the Router rebuilds them when its views change."""
import random

import numpy as np
import pytest

from hardware.perf import make_deployment
from hardware.profiles import get_profile
from model.specs import get_spec
from orchestrator.core.correction import Corrections
from orchestrator.core.pairsearch import decode_floor, prefill_floor, search_best_pair
from orchestrator.core.poolindex import DecodeIndex, PrefillIndex, ascending
from orchestrator.core.predictor import (DecodeState, PredictRequest, Predictor, PrefillState, best_pair,
                                         earliest_prefill, kv_arrival_s)
from orchestrator.core.queueplan import QueuedPrompt
from orchestrator.core.router import DecodeView, Placement, PrefillView, RouteRequest, Router
from orchestrator.core.sla import SLATarget

MODEL = get_spec("llama-3.1-70b")
TRN = make_deployment(MODEL, get_profile("trn2.48xlarge"), tp=64)
CS3 = make_deployment(MODEL, get_profile("cs3"), systems=4)  # speculative: steps amortised over drafts
CS3_LAUNCH = make_deployment(MODEL, get_profile("cs3@2024-08"), systems=4)


@pytest.mark.parametrize("n", [0, 1, 5, 64, 65, 700])
def test_ascending_yields_the_bound_then_id_order_however_far_it_is_read(n):
    rng = np.random.default_rng(n)
    key = rng.integers(0, max(1, n // 4), n).astype(float)  # many ties
    rank = rng.permutation(n)  # the tie-break: ascending's ties go by position, so it reads them in rank order
    by_rank = np.argsort(rank)
    for first in (1, 8):
        got = by_rank[np.concatenate(list(ascending(key[by_rank], first)))] if n else np.array([], dtype=int)
        assert got.tolist() == np.lexsort((rank, key)).tolist()


def _corrections(rng, n_prefill, n_decode):
    corr = Corrections(0.9, window=8, min_samples=2)
    for i in range(0, n_prefill, 2):
        for _ in range(3):
            corr.observe(f"p{i}", "prefill", rng.uniform(0.7, 1.6), 1.0)
            corr.observe(f"p{i}", "transfer", rng.uniform(0.7, 30.0), 1.0)
    for i in range(0, n_decode, 2):
        for _ in range(3):
            corr.observe(f"d{i}", "decode", rng.uniform(0.8, 1.4), 1.0)
    for i in range(0, n_decode, 3):  # "tpot" offsets of either sign, seconds per step, some larger than a step
        for _ in range(3):
            corr.observe(f"d{i}", "tpot", rng.uniform(0.0, 0.03), rng.choice((0.01, 0.05)))
    for i in range(1, n_decode, 4):  # "sharing": forecast steps measured shorter or longer
        for _ in range(3):
            corr.observe(f"d{i}", "sharing", rng.uniform(0.5, 1.6), 1.0)
    return corr


def _prefill(rng, i):
    queue = tuple(QueuedPrompt(rng.randint(1, 6000), -rng.random(), rng.choice((0, 1)), rng.choice((0.5, 1.0, 4.0)))
                  for _ in range(rng.randint(0, 10)))
    return PrefillState(f"p{i}", TRN, 8192, 8, queue, rng.uniform(-0.1, 0.3), rng.choice((1.0, 1.3)))


def _decode(rng, i, dep=CS3):
    """Running sequences that finish during the newcomer's output and requests still arriving: the
    newcomer can get a smaller batch than the step in flight's."""
    b = rng.randint(0, 70)
    running = min(b, rng.randint(0, 64))
    incoming = tuple(sorted((rng.uniform(0, 0.5), rng.randint(0, 3000), rng.randint(1, 500), rng.randint(100, 4000))
                            for _ in range(min(b - running, rng.randint(0, 3)))))
    remaining = tuple(sorted((rng.randint(0, 800), rng.randint(100, 8000)) for _ in range(running)))
    return DecodeState(f"d{i}", dep, b, b * rng.randint(100, 8000), 64, rng.randint(0, 400_000),
                       rng.choice([(), ((rng.uniform(0.002, 0.02), rng.randint(1, 500)),)]), rng.choice((1.0, 1.2)),
                       remaining=remaining, incoming=incoming, stall_fraction=rng.choice((0.0, 0.3)))


def _request(rng):
    return PredictRequest(rng.randint(1, 6000), rng.choice([1, 2, rng.randint(2, 1000)]), rng.uniform(0.2, 3.0),
                          rng.uniform(0.002, 0.02), priority=rng.randint(0, 1))


def _index(ps, ds):
    return (PrefillIndex(ps, ps, [True] * len(ps)),
            DecodeIndex(ds, ds, [True] * len(ds), [d.free_kv_tokens + 10**9 for d in ds]))


@pytest.mark.parametrize("seed", range(4))
def test_the_floors_are_below_every_workers_exact_parts(seed):
    rng = random.Random(seed)
    corr = _corrections(rng, 30, 30)
    pred = Predictor(corr, first_token_after_transfer=bool(seed % 2))
    ps = [_prefill(rng, i) for i in range(30)]
    ds = [_decode(rng, i, (CS3, CS3_LAUNCH)[seed % 2]) for i in range(30)]
    pi, di = _index(ps, ds)
    for _ in range(10):
        req, arrival = _request(rng), rng.uniform(0.0, 2.0)
        key, ttft, tail = prefill_floor(pred, req, pi, CS3, 0.0)
        for p, k, t, z in zip(ps, key, ttft, np.broadcast_to(tail, key.shape)):
            part = pred.prefill_part(req, p, CS3, 0.0)
            assert k <= part.ttft.bound_s + part.tail.bound_s and t <= part.ttft.bound_s
            assert z <= part.tail.bound_s
        for d, lb in zip(ds, decode_floor(pred, req, di)):
            assert lb <= pred.decode_part(req, d, arrival).decode.bound_s


@pytest.mark.parametrize("seed", range(5))
def test_the_pruned_search_finds_best_pairs_answer_with_sequences_finishing_mid_output(seed):
    rng = random.Random(50 + seed)
    corr = _corrections(rng, 40, 40)
    pred = Predictor(corr, first_token_after_transfer=bool(seed % 2))
    ps, ds = [_prefill(rng, i) for i in range(40)], [_decode(rng, i) for i in range(40)]
    pi, di = _index(ps, ds)
    found = 0
    for _ in range(10):
        req = _request(rng)
        pp = [pred.prefill_part(req, p, CS3, 0.0) for p in ps]
        first = earliest_prefill(req, pp)
        want = None if first is None else best_pair(req, pp, [pred.decode_part(req, d, kv_arrival_s(first)) for d in ds])
        assert search_best_pair(pred, req, pi, pi.healthy, di, di.healthy, CS3, 0.0) == want
        found += want is not None
    assert found >= 2


def _views(rng, n):
    return ([PrefillView(_prefill(rng, i), healthy=rng.random() > 0.1) for i in range(n)],
            [DecodeView(_decode(rng, i), 2_000_000, 64, healthy=rng.random() > 0.1) for i in range(n)])


def _decisions(router, views, reqs):
    return [router.place(r, *views, 0.0) for r in reqs]


def _route_requests(rng, n):
    return [RouteRequest(f"r{i}", rng.randint(1, 6000), rng.choice([1, rng.randint(2, 800)]),
                         SLATarget(rng.choice((300, 1500, 8000)), rng.choice((5, 15, 40)))) for i in range(n)]


def test_the_router_keeps_its_arrays_while_the_views_are_the_same_and_rebuilds_them_when_one_changes():
    rng = random.Random(7)
    corr = _corrections(rng, 20, 20)
    prefill, decode = _views(rng, 20)
    router, reqs = Router("sla", Predictor(corr)), _route_requests(rng, 12)
    _decisions(router, (prefill, decode), reqs[:1])
    kept = router._prefill_index, router._decode_index
    _decisions(router, (list(prefill), list(decode)), reqs[:1])  # new lists, the same views
    assert (router._prefill_index, router._decode_index) == kept
    prefill[3] = PrefillView(_prefill(rng, 3))  # one worker's state changed
    decode[5] = DecodeView(_decode(rng, 5), 2_000_000, 64)
    got = _decisions(router, (prefill, decode), reqs)
    assert router._prefill_index is not kept[0] and router._decode_index is not kept[1]
    assert got == _decisions(Router("sla", Predictor(corr)), (prefill, decode), reqs)  # as a fresh router
    for i in range(20):  # an observation: the correction vectors are gathered again
        corr.observe(f"d{i}", "decode", 3.0 if i % 3 else 0.5, 1.0)
        corr.observe(f"p{i}", "prefill", 2.0 if i % 2 else 0.6, 1.0)
    got = _decisions(router, (prefill, decode), reqs)
    assert got == _decisions(Router("sla", Predictor(corr)), (prefill, decode), reqs)


def test_one_router_ignores_view_order_and_never_picks_an_unhealthy_or_full_worker():
    rng = random.Random(8)
    corr = _corrections(rng, 30, 30)
    prefill, decode = _views(rng, 30)
    router, reqs = Router("sla", Predictor(corr), reject=False), _route_requests(rng, 15)
    want = _decisions(router, (prefill, decode), reqs)
    by_id = {v.worker_id: v for v in prefill + decode}
    placed = [g for g in want if isinstance(g, Placement)]
    assert placed
    for g in placed:
        assert by_id[g.prefill_worker].healthy and by_id[g.decode_worker].healthy
    for _ in range(3):
        rng.shuffle(prefill)
        rng.shuffle(decode)
        assert _decisions(router, (prefill, decode), reqs) == want
