"""Fast best pair: `best_pair`'s answer without computing every worker's part (issue 16, item 9).

Pure. Each side is searched best-first on a cheap lower bound of the quantity `best_pair` ranks it
by, and exact parts are computed only while a bound can still beat the best found. The bounds of a
whole pool are one vector expression over its `PrefillIndex` / `DecodeIndex` (orchestrator/core/
poolindex.py), candidates come out of `ascending` lazily:

- decode: decode.bound >= f_bound x q x step in flight + (n - 1) x (f_bound x `DecodeIndex.step_floor`
  + the "tpot" offset bound, clipped at 0 as the step is): the arrival's wait is at least q steps in
  flight, and no step the newcomer gets is faster than the floor (true of the analytic roofline and
  wafer models, the generation's own speculation included; profiles with measured tables and states
  with an explicit draft get the bound 0: always computed);
- prefill: ttft.bound >= the batch in progress + f_bound x (the queue's batches that end before the
  newcomer's batch can start, `PrefillIndex.before_rows` + the prompt alone) + request path (the
  prompt-alone term only on analytic profiles, where adding prompts to a batch never makes it
  faster), plus the transfer's floor (kv_transfer_time with an unbounded overlap) x its f_bound;
  all times the "ttft" factor (the factors are multiplied out once per corrections version and
  TTFT class: `PrefillIndex.floor_terms`).

Cost per decision: O(P + D) vector work, a partition of the candidates, and the exact parts of the
few that can still win.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np

from hardware.perf import Deployment, kv_transfer_time
from orchestrator.core.poolindex import DecodeIndex, PrefillIndex, ascending
from orchestrator.core.predictor import DecodePart, PredictRequest, Predictor, PrefillPart, completion_key, kv_arrival_s

_SLACK = 1.0 - 1e-9  # lower bounds are rounded down so float rounding never prunes an exact tie
_PEEL = 4  # candidates `_walk` takes one argmin at a time before it sorts the rest


def decode_floor(pred: Predictor, req: PredictRequest, pool: DecodeIndex) -> np.ndarray:
    """[D] seconds, at most each worker's decode.bound for `req` (0: no bound, measured or speculative)."""
    corr = pred.corrections

    def terms() -> tuple[np.ndarray, np.ndarray]:  # ([D], [D]): floor = wait + steps x per step
        f = pool.bound(corr, "decode") * _SLACK
        step = np.maximum(0.0, f * pool.bound(corr, "sharing") * pool.step_floor  # as decode_part clips it
                          + pool.offset_bound(corr, "tpot"))
        return np.where(pool.analytic, f * (corr.quantile * pool.step_now), 0.0), np.where(pool.analytic, step, 0.0)

    wait, step = pool.cached(corr, "decode_floor", terms)
    return wait + (req.max_tokens - 1) * step


def _walk(key: np.ndarray, pool: DecodeIndex | PrefillIndex, mask: np.ndarray) -> Iterator[tuple[float, str, int]]:
    """(bound, worker id, position) of the workers `mask` [n] keeps, in ascending (bound, id) order. Over
    the pool in id order (`by_id`: the first minimum is the lowest id), the first `_PEEL` by argmin (a
    search mostly reads two or three: its answer, those that fail and the bound that ends it), the rest
    `ascending`."""
    by_id = pool.by_id
    kept = np.where(mask, key, math.inf)[by_id]  # [n] id order; the others sort last
    taken = []
    while len(taken) < _PEEL:
        j = int(kept.argmin())
        lb = float(kept[j])
        if lb == math.inf:
            break
        i = int(by_id[j])
        yield lb, pool.ids[i], i
        kept[j] = math.inf
        taken.append(j)
    left = mask[by_id]  # [n] id order: kept and not yet yielded
    left[taken] = False
    for chunk in ascending(kept):
        for lb, j in zip(kept[chunk].tolist(), chunk.tolist()):
            if lb == math.inf and not left[j]:
                continue
            i = int(by_id[j])
            yield lb, pool.ids[i], i


def best_decode(pred: Predictor, req: PredictRequest, pool: DecodeIndex, mask: np.ndarray, arrival_s: float,
                need: str = "protects") -> DecodePart | None:
    """The decode part with the least decode.bound (ties: lowest id) among the workers `mask` [D] keeps
    that `need`: "protects" (fits and protects its running sequences' TPOT), "fits" or "any"."""
    want = req.prompt_tokens + req.max_tokens
    best: DecodePart | None = None
    for lb, wid, i in _walk(decode_floor(pred, req, pool), pool, mask):
        if best is not None and (lb, wid) > (best.decode.bound_s, best.worker_id):
            break
        st = pool.states[i]
        if need != "any" and not st.admits(want, arrival_s):  # DecodePart.fits, exactly
            continue
        d = pred.decode_part(req, st, arrival_s)
        if (need != "protects" or d.protects) and (
                best is None or (d.decode.bound_s, wid) < (best.decode.bound_s, best.worker_id)):
            best = d
    return best


def search_best_pair(pred: Predictor, req: PredictRequest, prefill: PrefillIndex, pmask: np.ndarray,
                     decode: DecodeIndex, dmask: np.ndarray, dst: Deployment,
                     now: float) -> tuple[PrefillPart, DecodePart] | None:
    """The pair `best_pair` would choose from the parts of every worker the masks ([P], [D]) keep (same
    ties), computing few of them; the decode parts are taken at the KV arrival of `earliest_prefill`,
    as the router's rule says. `dst`: the kept decode workers' deployment (one per call)."""
    key, ttft, tail = prefill_floor(pred, req, prefill, dst, now)
    cands = pmask & (ttft <= req.ttft_s)  # else ttft.bound > target
    parts: dict[int, PrefillPart] = {}

    def part(i: int) -> PrefillPart:
        got = parts.get(i)
        if got is None:
            got = parts[i] = pred.prefill_part(req, prefill.states[i], dst, now)
        return got

    first = _best_prefill(prefill, key, cands, part, lambda p: p.ttft.bound_s <= req.ttft_s)
    if first is None:
        return None
    d = best_decode(pred, req, decode, dmask, kv_arrival_s(first))
    if d is None:
        return None
    steps = req.max_tokens - 1
    inv = 1.0 / steps if steps else 0.0

    def meets(p: PrefillPart) -> bool:
        return p.ttft.bound_s <= req.ttft_s and (not steps or (p.tail.bound_s + d.decode.bound_s) * inv <= req.tpot_s)

    if meets(first):
        return first, d
    if steps:  # only those whose tail can fit d's TPOT budget (the first token after the transfer: none)
        cands = cands & ((tail + d.decode.bound_s) * inv <= req.tpot_s)
    best = _best_prefill(prefill, key, cands, part, meets)
    return None if best is None else (best, d)


def best_local(pred: Predictor, req: PredictRequest, decode: DecodeIndex, mask: np.ndarray,
               beat_s: float = math.inf) -> tuple[PrefillPart, DecodePart] | None:
    """Conditional disaggregation: among the decode workers `mask` [D] keeps, the one whose own prefill
    of `req` (Predictor.local_parts) meets both targets with the earliest completion (bound) below
    `beat_s` (the best disaggregated pair's), ties by lowest id. Candidates are taken best-first on a
    floor of that completion: the prompt alone, plus `decode_floor`."""
    corr = pred.corrections
    alone = decode.alone(req.prompt_tokens)[decode.dep_of]  # [D] seconds
    ttft = (alone * decode.bound(corr, "local_prefill") + decode.path) * decode.ttft_bound(corr, req.ttft_s)
    # free KV bounds the room it can have (DecodeState.has_room_until counts the reservations due by its end)
    cands = mask & (decode.free_kv >= req.prompt_tokens + req.max_tokens) & (ttft * _SLACK <= req.ttft_s)
    best: tuple[PrefillPart, DecodePart] | None = None
    best_key = (beat_s, "")
    for lb, wid, i in _walk((ttft + decode_floor(pred, req, decode)) * _SLACK, decode, cands):
        if (lb, wid) >= best_key:
            break
        pp, dp = pred.local_parts(req, decode.states[i])
        if not pred.combine(req, pp, dp).ok:
            continue
        k = (completion_key(req, pp, dp), wid)
        if k < best_key:
            best, best_key = (pp, dp), k
    return best


def best_effort_pair(pred: Predictor, req: PredictRequest, prefill: PrefillIndex, pmask: np.ndarray,
                     decode: DecodeIndex, dmask: np.ndarray, dst: Deployment,
                     now: float) -> tuple[PrefillPart, DecodePart, DecodePart | None, DecodePart | None]:
    """When no pair meets the SLA: the prefill part with the earliest KV arrival whatever its TTFT, and
    at that arrival the decode part with the least decode.bound, the same among those that fit and
    among those that also protect their running sequences (None: no such decode worker); few exact
    parts, as the search."""
    key, _, _ = prefill_floor(pred, req, prefill, dst, now)
    pp = _best_prefill(prefill, key, pmask, lambda i: pred.prefill_part(req, prefill.states[i], dst, now),
                       lambda p: True)
    arrival = kv_arrival_s(pp)
    fit = best_decode(pred, req, decode, dmask, arrival, need="fits")
    protect = fit if fit is None or fit.protects else best_decode(pred, req, decode, dmask, arrival)
    closest = fit or best_decode(pred, req, decode, dmask, arrival, need="any")
    return pp, closest, fit, protect


def prefill_floor(pred: Predictor, req: PredictRequest, pool: PrefillIndex, dst: Deployment,
                  now: float) -> tuple[np.ndarray, np.ndarray, np.ndarray | float]:
    """[P] seconds, at most each worker's ttft.bound + tail.bound for `req` towards `dst`; [P] at most
    its ttft.bound; [P] (or 0.0) at most its tail.bound."""
    alone = pool.alone(req.prompt_tokens)  # [deployments] seconds (the prompt-alone term: analytic profiles only)
    # [deployments] seconds, the transfer's floor: exposed transfer is non-increasing in the prefill time
    tr = [kv_transfer_time(dep, dst, dep.model.kv_bytes(req.prompt_tokens, dep.kv_dtype), 1e30) for dep in pool.deps]
    if len(pool.deps) == 1:  # a homogeneous pool: scalars
        own, tr = 0.0 if pool.measured[0] else float(alone[0]), tr[0]
    else:
        own, tr = np.where(pool.measured, 0.0, alone)[pool.dep_of], np.array(tr)[pool.dep_of]
    after = pred.first_token_after_transfer
    g, wait, prefill, path, transfer = pool.floor_terms(pred.corrections, req.ttft_s, after, _SLACK)
    # g x (batch in progress + queue ahead + the prompt alone + path), the factors folded in beforehand
    ttft = g * np.maximum(pool.busy_until - now, 0.0) + wait[pool.before_rows(now + req.ttft_s)] + prefill * own + path
    tail = transfer * tr
    if after:  # the transfer inside the TTFT, under its "ttft" factor
        key = ttft + tail
        return key, key, 0.0
    return ttft + tail, ttft, tail


def _best_prefill(pool: PrefillIndex, key: np.ndarray, mask: np.ndarray, part: Callable[[int], PrefillPart],
                  ok: Callable[[PrefillPart], bool]) -> PrefillPart | None:
    """The worker `mask` keeps with the least ttft.bound + tail.bound (ties: lowest id) among those whose
    part `ok` accepts; `key` [P]: the floors of that sum."""
    best: PrefillPart | None = None
    best_key = (0.0, "")
    for lb, wid, i in _walk(key, pool, mask):
        if best is not None and (lb, wid) > best_key:
            break
        p = part(i)
        if not ok(p):
            continue
        k = (p.ttft.bound_s + p.tail.bound_s, wid)
        if best is None or k < best_key:
            best, best_key = p, k
    return best
