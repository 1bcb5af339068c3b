"""Fast best pair: `best_pair`'s answer without computing every worker's part (issue 16, item 9).

Pure. Each side is searched best-first on a cheap lower bound of the quantity `best_pair` ranks it
by, and exact parts are computed only while a bound can still beat the best found:

- decode: decode.bound >= f_bound x step_now x (q + n - 1), because the step with the newcomer at a
  larger context is no faster than the step in flight (true of the analytic roofline and wafer
  models; profiles with measured tables and speculative decoding get the bound 0: always computed);
- prefill: ttft.bound >= the batch in progress + f_bound x (the queue's batches that end before the
  newcomer's batch can start + the prompt alone) + request path (the prompt-alone term only on
  analytic profiles, where adding prompts to a batch never makes it faster), plus the transfer's
  floor (kv_transfer_time with an unbounded overlap) x its f_bound; all times the "ttft" factor.

Cost: O(P log P + D log D) cheap steps plus the exact parts of the few candidates; the states carry
their precomputation (PrefillState.plan, DecodeState.step_now_s), so build them when a worker's
state changes, not per decision.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable, Sequence

from hardware.perf import Deployment, kv_transfer_time, prefill_time
from orchestrator.core.predictor import (DecodePart, DecodeState, PredictRequest, Predictor, PrefillPart, PrefillState,
                                         completion_key, kv_arrival_s)
from orchestrator.core.correction import ttft_key
from orchestrator.core.queueplan import order_key

_SLACK = 1.0 - 1e-9  # lower bounds are rounded down so float rounding never prunes an exact tie


def _best_decode(pred: Predictor, req: PredictRequest, decode: Sequence[DecodeState],
                 arrival_s: float, protecting: bool = True) -> DecodePart | None:
    """The fitting decode part with the least decode.bound (ties: lowest id); `protecting`: among those
    that also protect their running sequences' TPOT."""
    steps, corr = req.max_tokens - 1, pred.corrections
    need = req.prompt_tokens + req.max_tokens
    cands = []
    for st in decode:
        if not st.admits(need, arrival_s):  # DecodePart.fits, exactly
            continue
        lb = 0.0
        if st.spec is None and st.dep.hw.perf.measured is None:
            lb = corr.factors(st.worker_id, "decode").bound * st.step_now_s * (corr.quantile + steps) * _SLACK
        cands.append((lb, st.worker_id, st))
    cands.sort(key=lambda c: (c[0], c[1]))
    best: DecodePart | None = None
    for lb, wid, st in cands:
        if best is not None and (lb, wid) > (best.decode.bound_s, best.worker_id):
            break
        d = pred.decode_part(req, st, arrival_s)
        if d.fits and (d.protects or not protecting) and (
                best is None or (d.decode.bound_s, wid) < (best.decode.bound_s, best.worker_id)):
            best = d
    return best


def search_best_pair(pred: Predictor, req: PredictRequest, prefill: Sequence[PrefillState],
                     decode: Sequence[DecodeState], dst: Deployment,
                     now: float) -> tuple[PrefillPart, DecodePart] | None:
    """The pair `best_pair` would choose from every worker's parts (same ties), computing few of them;
    the decode parts are taken at the KV arrival of `earliest_prefill`, as the router's rule says.
    `dst`: the decode workers' deployment (one per call; heterogeneous pools: one call per group)."""
    cands = _prefill_candidates(pred, req, prefill, dst, now)
    parts: dict[str, PrefillPart] = {}

    def part(st: PrefillState) -> PrefillPart:
        got = parts.get(st.worker_id)
        if got is None:
            got = parts[st.worker_id] = pred.prefill_part(req, st, dst, now)
        return got

    first = _best_prefill(cands, part, lambda p: p.ttft.bound_s <= req.ttft_s)
    if first is None:
        return None
    d = _best_decode(pred, req, decode, kv_arrival_s(first))
    if d is None:
        return None
    steps = req.max_tokens - 1
    inv = 1.0 / steps if steps else 0.0

    def meets(p: PrefillPart) -> bool:
        return p.ttft.bound_s <= req.ttft_s and (not steps or (p.tail.bound_s + d.decode.bound_s) * inv <= req.tpot_s)

    best = first if meets(first) else _best_prefill(cands, part, meets)
    return None if best is None else (best, d)


def best_local(pred: Predictor, req: PredictRequest, decode: Sequence[DecodeState],
               beat_s: float = math.inf) -> tuple[PrefillPart, DecodePart] | None:
    """Conditional disaggregation: the decode worker whose own prefill of `req` (Predictor.local_parts)
    meets both targets with the earliest completion (bound) below `beat_s` (the best disaggregated
    pair's), ties by lowest id. Candidates are taken best-first on a floor of that completion: the
    prompt alone, plus the decode floor of `_best_decode` on analytic profiles."""
    steps, corr = req.max_tokens - 1, pred.corrections
    need = req.prompt_tokens + req.max_tokens
    own: dict[int, float] = {}
    cands = []
    for st in decode:
        if not st.has_room_now(need):
            continue
        alone = own.get(id(st.dep))
        if alone is None:
            alone = own[id(st.dep)] = prefill_time(st.dep, [req.prompt_tokens])
        g = corr.factors(ttft_key(st.worker_id, req.ttft_s), "ttft").bound
        ttft = (alone * corr.factors(st.worker_id, "local_prefill").bound + st.dep.hw.perf.request_path_s) * g
        if ttft * _SLACK > req.ttft_s:
            continue
        lb = ttft
        if st.spec is None and st.dep.hw.perf.measured is None:
            lb += corr.factors(st.worker_id, "decode").bound * st.step_now_s * (corr.quantile + steps)
        cands.append((lb * _SLACK, st.worker_id, st))
    cands.sort(key=lambda c: (c[0], c[1]))
    best: tuple[PrefillPart, DecodePart] | None = None
    best_key = (beat_s, "")
    for lb, wid, st in cands:
        if (lb, wid) >= best_key:
            break
        pp, dp = pred.local_parts(req, st)
        if not pred.combine(req, pp, dp).ok:
            continue
        k = (completion_key(req, pp, dp), wid)
        if k < best_key:
            best, best_key = (pp, dp), k
    return best


def best_effort_pair(pred: Predictor, req: PredictRequest, prefill: Sequence[PrefillState],
                     decode: Sequence[DecodeState], dst: Deployment,
                     now: float) -> tuple[PrefillPart, DecodePart | None, DecodePart | None]:
    """When no pair meets the SLA: the prefill part with the earliest KV arrival whatever its TTFT, and
    at that arrival the fitting decode part with the least decode.bound, and the same among those that
    protect their running sequences (None: no such decode worker); few exact parts, as the search."""
    cands = _prefill_candidates(pred, req, prefill, dst, now, meeting_ttft=False)
    pp = _best_prefill(cands, lambda st: pred.prefill_part(req, st, dst, now), lambda p: True)
    arrival = kv_arrival_s(pp)
    fit = _best_decode(pred, req, decode, arrival, protecting=False)
    protect = fit if fit is None or fit.protects else _best_decode(pred, req, decode, arrival)
    return pp, fit, protect


def _prefill_candidates(pred: Predictor, req: PredictRequest, prefill: Sequence[PrefillState], dst: Deployment,
                        now: float, meeting_ttft: bool = True) -> list[tuple[float, str, PrefillState]]:
    """(floor of ttft.bound + tail.bound, worker id, state) of the workers whose floor can meet the TTFT
    target (every worker unless `meeting_ttft`), ascending."""
    corr = pred.corrections
    key = order_key(req.priority, now, req.ttft_s)
    alone: dict[tuple[int, float], float] = {}
    floor: dict[int, float] = {}  # exposed transfer is non-increasing in the prefill time: its floor
    cands = []
    for st in prefill:
        plan = st.plan
        pos = bisect.bisect_right(plan.keys, key)
        b = plan.batch_of[pos - 1] if pos else 0
        before = plan.ends_s[b - 1] if b else 0.0
        own = 0.0
        if st.dep.hw.perf.measured is None:
            k = (id(st.dep), st.slowdown)
            own = alone.get(k)
            if own is None:
                own = alone[k] = prefill_time(st.dep, [req.prompt_tokens]) * st.slowdown
        tr = floor.get(id(st.dep))
        if tr is None:
            kv = st.dep.model.kv_bytes(req.prompt_tokens, st.dep.kv_dtype)
            tr = floor[id(st.dep)] = kv_transfer_time(st.dep, dst, kv, 1e30)
        tr *= corr.factors(st.worker_id, "transfer").bound
        busy = st.busy_until_s - now
        lb = (busy if busy > 0 else 0.0) + corr.factors(st.worker_id, "prefill").bound * (before + own) + \
            st.dep.hw.perf.request_path_s
        g = corr.factors(ttft_key(st.worker_id, req.ttft_s), "ttft").bound  # scales the whole TTFT
        ttft = (lb + tr if pred.first_token_after_transfer else lb) * g
        if ttft * _SLACK <= req.ttft_s or not meeting_ttft:  # else ttft.bound > target
            cands.append(((ttft if pred.first_token_after_transfer else ttft + tr) * _SLACK, st.worker_id, st))
    cands.sort(key=lambda c: (c[0], c[1]))
    return cands


def _best_prefill(cands: list[tuple[float, str, PrefillState]], part: Callable[[PrefillState], PrefillPart],
                  ok: Callable[[PrefillPart], bool]) -> PrefillPart | None:
    """The candidate with the least ttft.bound + tail.bound (ties: lowest id) among those `ok` accepts."""
    best: PrefillPart | None = None
    best_key = (0.0, "")
    for lb, wid, st in cands:
        if best is not None and (lb, wid) > best_key:
            break
        p = part(st)
        if not ok(p):
            continue
        k = (p.ttft.bound_s + p.tail.bound_s, wid)
        if best is None or k < best_key:
            best, best_key = p, k
    return best
