"""Places a request on a (prefill worker, decode worker) pair, or rejects it early.

Pure policy: it reads only its arguments (pool views and the current time), its predictor's
corrections and its own round-robin cursor. The live engine and the simulator both call
`Router.place` with views built around the predictor's worker states.

Policies:
- `round_robin`: the next worker of each pool in turn (a baseline).
- `least_loaded`: the prefill worker with the fewest prompt tokens queued or running, the decode
  worker with the lowest occupancy (the larger of its batch and KV fill fractions).
- `cost`: Dynamo's KV router without SLA knowledge: cost = PREFILL_WEIGHT x prefill blocks still to
  compute on the prefill worker (its queue, running batch and this prompt) + decode KV blocks in use
  on the decode worker (with this request's). The sum is separable, so each side is an argmin.
- `sla` (the default): the pair with the earliest predicted completion (`predictor.best_pair`, at
  the corrections' quantile) among the pairs predicted to meet both targets without pushing a
  sequence already decoding past its own TPOT target. A decode worker whose batch or KV is full
  counts the wait until enough of its sequences finish (less the newcomer's own time in prefill,
  taken at the earliest KV arrival the prefill pool offers). Earliest completion frees the pair
  soonest for the requests behind it (the router-comparison experiment measures the rule against
  the baselines: README, "Router comparison"). When no pair is
  predicted to meet the SLA the request is rejected at once (RESOURCE_EXHAUSTED, naming the
  predictions against the targets, or the floor when the TTFT target is below what an idle prefill
  worker can do): it never waits in a queue only to miss. `reject=False` places it on the best
  effort pair instead (the experiment's "would it have missed?" run), and so does the router while
  the pair's workers are cold (fewer than Corrections.min_samples prefill batches or decode steps
  observed): a prior can be far off (a host whose `cpu` profile is not measured), and a router that
  rejected on it would never see the observations that correct it.
  Conditional disaggregation (`local_prefill_max_tokens` > 0): a prompt of at most that many tokens
  may instead be prefilled by a decode worker itself, between two of its steps, with no prefill
  queue and no KV transfer (Predictor.local_parts). The router chooses it when its predicted
  completion is earlier than the best disaggregated pair's (or no pair meets the SLA) and it meets
  both targets, counting the stall to the sequences decoding there against their TPOT targets;
  only once some prefill worker is warm (see `_place_by_sla`).

Every placement carries the predictor's estimate for the chosen pair, whatever the policy, so the
prediction error is measured for every policy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from hardware.perf import Deployment, kv_transfer_time
from orchestrator.core.pairsearch import best_effort_pair, best_local, search_best_pair
from orchestrator.core.poolindex import DecodeIndex, PrefillIndex
from orchestrator.core.predictor import (DecodePart, DecodeState, PairPrediction, PredictRequest, Predictor,
                                         PrefillPart, PrefillState, completion_key)
from orchestrator.core.sla import SLATarget

PREFILL_WEIGHT = 1.0  # Dynamo's default kv_overlap_score_weight: prefill blocks and decode blocks count alike


@dataclass(frozen=True, slots=True)
class RouteRequest:
    request_id: str
    prompt_tokens: int
    max_tokens: int
    sla: SLATarget


@dataclass(frozen=True, slots=True)
class PrefillView:
    """What the router knows about one prefill worker: the predictor's state plus health."""

    state: PrefillState
    running_tokens: int = 0  # prompt tokens in the batch in progress
    healthy: bool = True
    queued_tokens: int = field(init=False)  # prompt tokens waiting or running on it

    def __post_init__(self) -> None:
        object.__setattr__(self, "queued_tokens", self.running_tokens + sum(self.state.plan.lengths))

    @property
    def worker_id(self) -> str:
        return self.state.worker_id


@dataclass(frozen=True, slots=True)
class DecodeView:
    """What the router knows about one decode worker: the predictor's state plus capacity and health."""

    state: DecodeState
    total_kv_tokens: int
    block_tokens: int
    healthy: bool = True

    @property
    def worker_id(self) -> str:
        return self.state.worker_id

    @property
    def occupancy(self) -> float:
        st = self.state
        return max(st.batch / st.max_batch, 1.0 - st.free_kv_tokens / self.total_kv_tokens)

    @property
    def used_blocks(self) -> int:
        return -(-(self.total_kv_tokens - self.state.free_kv_tokens) // self.block_tokens)


@dataclass(slots=True)  # not frozen, for speed: see predictor.Estimate
class Placement:
    prefill_worker: str
    decode_worker: str
    predicted_ttft_ms: float  # point estimates (median-corrected)
    predicted_tpot_ms: float
    ttft_bound_ms: float  # at the predictor's quantile
    tpot_bound_ms: float
    ttft_model_ms: float  # the TTFT point from the parts alone: the caller observes the "ttft" correction against it
    tpot_wait_ms: float = 0.0  # PairPrediction.tpot_wait_s: with the time its steps took, what the "tpot"
    # correction observes against
    step_model_ms: float = 0.0  # PairPrediction.step_model_s: what the "sharing" correction observes against
    local: bool = False  # the decode worker prefills it itself (prefill_worker == decode_worker); no transfer


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str
    code: str = "RESOURCE_EXHAUSTED"  # gRPC status name
    kind: str = "no_worker"  # one of REJECTION_KINDS: the metrics label


REJECTION_KINDS = ("below_floor", "ttft", "tpot", "running_tpot", "kv_full", "kv_capacity", "no_worker")
POLICIES = ("round_robin", "least_loaded", "cost", "sla")


class Router:
    def __init__(self, policy: str = "sla", predictor: Predictor | None = None, reject: bool = True,
                 local_prefill_max_tokens: int = 0):
        """`local_prefill_max_tokens`: the longest prompt the `sla` policy may prefill on a decode
        worker (conditional disaggregation; 0: never)."""
        if policy not in POLICIES:
            raise ValueError(f"policy: unknown router policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if not isinstance(local_prefill_max_tokens, int) or local_prefill_max_tokens < 0:
            raise ValueError(f"local_prefill_max_tokens: must be an integer >= 0, got {local_prefill_max_tokens!r}")
        self.policy = policy
        self.predictor = predictor if predictor is not None else Predictor()
        self.reject = reject
        self.local_prefill_max_tokens = local_prefill_max_tokens
        self._cursor = 0
        self._prefill_index: PrefillIndex | None = None  # the last views' arrays (`_indexes`)
        self._decode_index: DecodeIndex | None = None

    def place(self, req: RouteRequest, prefill: Sequence[PrefillView], decode: Sequence[DecodeView],
              now: float, reject: bool | None = None) -> Placement | Rejection:
        """Choose workers for `req` at time `now` (seconds, the views' epoch) given the pools' current views.
        `reject=False` places on the best-effort pair what `sla` would reject (a request already mid-stream,
        migrated); None: the router's setting. Without a healthy worker with room it still rejects.
        Pass the same view objects while a pool's state has not changed: the router keeps the arrays it
        builds from them (PrefillIndex, DecodeIndex) until the views passed change."""
        pidx, didx = self._indexes(prefill, decode)
        need = req.prompt_tokens + req.max_tokens
        pmask = pidx.healthy  # [P]
        dmask = didx.healthy if need <= didx.least_total_kv else didx.healthy & (didx.total_kv >= need)  # [D]
        if not pidx.any_healthy:
            return Rejection("no healthy prefill worker", "UNAVAILABLE")
        if not didx.any_healthy:
            return Rejection("no healthy decode worker", "UNAVAILABLE")
        if dmask is not didx.healthy and not dmask.any():
            return Rejection(f"prompt + max_tokens = {need} tokens exceeds every decode worker's KV capacity",
                             kind="kv_capacity")
        preq = PredictRequest.from_sla(req.prompt_tokens, req.max_tokens, req.sla)
        if self.policy == "sla":
            return self._place_by_sla(preq, pidx, pmask, didx, dmask, now, self.reject if reject is None else reject)
        pf = [prefill[i] for i in np.flatnonzero(pmask).tolist()]
        dc = [decode[i] for i in np.flatnonzero(dmask).tolist()]
        if self.policy == "round_robin":
            p, d = pf[self._cursor % len(pf)], dc[self._cursor % len(dc)]
            self._cursor += 1
        elif self.policy == "least_loaded":
            p = min(pf, key=lambda v: (v.queued_tokens, v.worker_id))
            d = min(dc, key=lambda v: (v.occupancy, -v.state.free_kv_tokens, v.worker_id))
        else:
            p = min(pf, key=lambda v: (PREFILL_WEIGHT * _blocks(v.queued_tokens + req.prompt_tokens, dc[0]),
                                       v.worker_id))
            d = min(dc, key=lambda v: (v.used_blocks + _blocks(need, v), v.worker_id))
        return _placement(self.predictor.predict(preq, p.state, d.state, now))

    def _indexes(self, prefill: Sequence[PrefillView],
                 decode: Sequence[DecodeView]) -> tuple[PrefillIndex, DecodeIndex]:
        """The pools' arrays: the last ones while the views passed are the same (or equal) ones, else new."""
        p, d = self._prefill_index, self._decode_index
        if p is None or not _same(p.views, prefill):
            p = self._prefill_index = PrefillIndex(prefill, [v.state for v in prefill], [v.healthy for v in prefill])
        if d is None or not _same(d.views, decode):
            d = self._decode_index = DecodeIndex(decode, [v.state for v in decode], [v.healthy for v in decode],
                                                 [v.total_kv_tokens for v in decode])
        return p, d

    def _place_by_sla(self, req: PredictRequest, pidx: PrefillIndex, pmask: np.ndarray, didx: DecodeIndex,
                      dmask: np.ndarray, now: float, reject: bool) -> Placement | Rejection:
        """`pmask` [P], `dmask` [D]: the healthy workers (decode: with the KV capacity for `req`)."""
        pred, best = self.predictor, None
        corr = pred.corrections
        # local prefill competes once the prefill pool's speed is learned: before, a learned local option
        # would beat a remote prior, keep the prefill workers from ever being observed, and so keep
        # the router from ever rejecting (it does not reject on unlearned predictions)
        learned = pidx.any_warm(corr, "prefill")
        local = req.prompt_tokens <= self.local_prefill_max_tokens and learned
        groups = [0] if len(didx.deps) == 1 else list(dict.fromkeys(didx.dep_of[dmask].tolist()))  # deployments
        dst = didx.deps[groups[0]]
        floor = self._ttft_floor(req, pidx, pmask, didx, dmask if local else None, dst) if reject and learned else None
        if floor is not None:
            # no worker can: say so without searching
            q = round(100 * pred.corrections.quantile)
            return Rejection(f"ttft_ms target {req.ttft_s * 1e3:.0f} ms is below the predicted floor of "
                             f"{floor * 1e3:.0f} ms (p{q}) for a {req.prompt_tokens}-token prompt on an idle "
                             f"prefill worker", kind="below_floor")
        for j in groups:  # the KV link, and so the prefill parts, depend on the decode deployment
            kept = dmask if len(didx.deps) == 1 else dmask & (didx.dep_of == j)
            found = search_best_pair(pred, req, pidx, pmask, didx, kept, didx.deps[j], now)
            if found is not None and (best is None or completion_key(req, *found) < completion_key(req, *best)):
                best = found
        if local:
            beat = math.inf if best is None else completion_key(req, *best)
            here = best_local(pred, req, didx, dmask, beat)
            if here is not None:
                return _placement(pred.combine(req, *here), local=True)
        if best is not None:
            return _placement(pred.combine(req, *best))
        pp, dp, why = self._best_effort(req, pidx, pmask, didx, dmask, dst, now)
        if not reject or not (corr.warm(pp.worker_id, "prefill") and corr.warm(dp.worker_id, "decode")):
            return _placement(pred.combine(req, pp, dp))  # no rejection on a prior: its workers must learn first
        if local:  # the other way it had: on the closest decode worker, prefilled there
            lp, ld = pred.local_parts(req, didx.states[didx.ids.index(dp.worker_id)])
            why = replace(why, reason=f"{why.reason}; prefilled on {dp.worker_id} itself: "
                                      f"{_local_failure(pred.combine(req, lp, ld), ld, req)}")
        return why

    def _best_effort(self, req: PredictRequest, pidx: PrefillIndex, pmask: np.ndarray, didx: DecodeIndex,
                     dmask: np.ndarray, dst: Deployment, now: float) -> tuple[PrefillPart, DecodePart, Rejection]:
        """No pair meets the SLA: the pair closest to it, and why it fails (pairsearch.best_effort_pair)."""
        pred = self.predictor
        pp, dp, fit, protect = best_effort_pair(pred, req, pidx, pmask, didx, dmask, dst, now)
        got = pred.combine(req, pp, dp)
        ttft_ms, tpot_ms = got.ttft.bound_s * 1e3, got.tpot.bound_s * 1e3
        q = round(100 * pred.corrections.quantile)
        against = (f"predicted TTFT {ttft_ms:.0f} ms (p{q}) against the target {req.ttft_s * 1e3:.0f} ms, "
                   f"TPOT {tpot_ms:.1f} ms (p{q}) against {req.tpot_s * 1e3:.1f} ms")
        if fit is None:
            return pp, dp, Rejection(f"every decode worker is full (batch slots or KV blocks, even once its "
                                     f"running sequences finish); {against}", kind="kv_full")
        if pp.ttft.bound_s > req.ttft_s:
            return pp, dp, Rejection(f"no pair is predicted to meet the SLA: {against}", kind="ttft")
        if not fit.protects or protect is None:
            worst = "" if fit.tightest is None else (
                f" (the shortest sequence of the {fit.tightest[1] * 1e3:.4g} ms target there would get "
                f"{fit.tightest[0] * 1e3:.4g} ms, p{q})")
            return pp, dp, Rejection(f"admitting it would push sequences already decoding past their TPOT target"
                                     f"{worst}; {against}", kind="running_tpot")
        return pp, dp, Rejection(f"no pair is predicted to meet the SLA: {against}", kind="tpot")

    def _ttft_floor(self, req: PredictRequest, pidx: PrefillIndex, pmask: np.ndarray, didx: DecodeIndex,
                    local: np.ndarray | None, dst: Deployment) -> float | None:
        """Seconds (bound), when it is above the request's TTFT target (else None): TTFT of the prompt alone
        on an idle prefill worker, the best of the workers `pmask` [P] keeps, or prefilled on an idle
        decode worker that `local` [D] keeps (None: none), without the "ttft" correction (that learns
        queueing, which an idle worker has none of). The perf-model times are taken once per distinct
        worker setup, the corrections per worker. One worker's (`PrefillIndex.probe`) settles most
        requests: when it meets the target, so does the floor."""
        corr = self.predictor.corrections
        alone, own, tr = pidx.alone(req.prompt_tokens), [], []
        for j, slowdown in pidx.setups:
            dep, s = pidx.deps[j], float(alone[j]) * slowdown
            own.append(s)
            tr.append(kv_transfer_time(dep, dst, dep.model.kv_bytes(req.prompt_tokens, dep.kv_dtype), s))
        after = self.predictor.first_token_after_transfer
        probe = pidx.probe(corr)
        if probe is not None and pmask[probe[0]]:  # the same arithmetic as the vector below, on one worker
            _, k, bp_i, bt_i, path_i = probe
            one = own[k] * bp_i + path_i
            if (one + tr[k] * bt_i if after else one) <= req.ttft_s:
                return None
        bp, bt = pidx.bound(corr, "prefill"), pidx.bound(corr, "transfer")
        if len(own) == 1:  # one setup: scalars
            own_s, tr_s = own[0], tr[0]
        else:
            own_s, tr_s = np.array(own)[pidx.setup_of], np.array(tr)[pidx.setup_of]
        ttft = own_s * bp + pidx.path  # [P] seconds
        if after:
            ttft = ttft + tr_s * bt
        best = float(ttft.min(initial=math.inf, where=pmask))
        if local is not None:
            here = didx.alone(req.prompt_tokens)[didx.dep_of] * didx.bound(corr, "local_prefill") + didx.path  # [D]
            best = min(best, float(here[local].min()))
        return best if best > req.ttft_s else None


def _same(kept: tuple, views: Sequence) -> bool:
    """The same views, in the same order: identical objects (C-speed), else equal ones (frozen: an equal
    view describes the same state, so its arrays are the same)."""
    return len(kept) == len(views) and kept == tuple(views)


def _blocks(tokens: int, d: DecodeView) -> int:
    return -(-tokens // d.block_tokens)


def _local_failure(got: PairPrediction, dp: DecodePart, req: PredictRequest) -> str:
    """Why a local prefill that is not `ok` fails, for a rejection's message."""
    if not dp.fits:
        return "no KV room there from now to its last token"
    if not dp.protects:
        return "it would push sequences decoding there past their TPOT target"
    return (f"predicted TTFT {got.ttft.bound_s * 1e3:.0f} ms, TPOT {got.tpot.bound_s * 1e3:.1f} ms "
            f"against {req.ttft_s * 1e3:.0f} ms, {req.tpot_s * 1e3:.1f} ms")


def _placement(got: PairPrediction, local: bool = False) -> Placement:
    return Placement(got.prefill_worker, got.decode_worker, got.ttft.point_s * 1e3, got.tpot.point_s * 1e3,
                     got.ttft.bound_s * 1e3, got.tpot.bound_s * 1e3, got.ttft_model_s * 1e3, got.tpot_wait_s * 1e3,
                     got.step_model_s * 1e3, local)
