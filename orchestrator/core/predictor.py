"""The latency predictor (issue 16, item 1): TTFT and TPOT of a request on a (prefill, decode) pair.

Pure: state and `now` are arguments; times come from hardware/perf.py, scaled by online corrections
(orchestrator/core/correction.py): point = perf-model seconds x the median observed/predicted ratio,
bound = x its q-quantile (the "tpot" correction instead adds the median / q-quantile of observed -
predicted seconds per step). A bound of a sum is the sum of the parts' bounds (conservative).

What is predicted is what the project measures (orchestrator/simulator/report.py, serving/engine.py):
TTFT = arrival -> the first token, which the *prefill* worker samples; TPOT = (last token - first
token) / (n - 1). So the decode-side wait and steps belong to TPOT, not TTFT:

    TTFT = (queue wait + own batch [+ KV transfer tail] + request path) x the "ttft" correction
    TPOT = ([KV transfer tail] + wait for the next step boundary [+ wait for a batch slot or KV room
            beyond the KV's arrival] + (n - 1) steps) / (n - 1) + the "tpot" offset

Local prefill (conditional disaggregation, `local_parts`): the decode worker prefills the prompt
itself between two steps, writing its KV straight into its own pool; no transfer, no prefill queue:

    TTFT = (wait for the step in flight + local prefills placed there before it + own prefill
            + request path) x the "ttft" correction (keyed by the decode worker)

and every sequence decoding there stalls once by the prefill's time, after those of the local
prefills queued before it: a stall of S seconds adds S / n to the TPOT of a sequence of n steps, so
the two together must not push the shortest sequence of each TPOT
target there (`DecodeState.tpot_targets`) past that target (a short output has few steps to spread
it over; the mean of `remaining` spreads it in the TPOT reported for them). The local prefills a
worker keeps running stretch all its steps: `stall_fraction`, measured (orchestrator/core/stall.py).
Chunked (`DecodeState.chunk_tokens`, the simulator's): the local prompts ride the steps of the
sequences decoding there (and of those that will: the local prompts queued before it join once
prefilled), that many tokens a step, each step longer by perf.chunk_step_time (what the running
sequences are held up by); what is left once no sequence decodes runs whole.

The queue wait counts the prompts that will arrive during it with a tighter TTFT target and so run
first (`overtaken`, from the worker's measured arrivals, orchestrator/core/arrivals.py: the recent
load for the first seconds of the wait, the long-run load beyond them, as a burst passes).

The transfer tail sits in TTFT when `first_token_after_transfer` (live: PrefillWorker.prefill
returns once the KV is committed) and in TPOT otherwise (the simulator releases the first token when
the prefill batch ends). Both are predicted from the same parts; pick the mode that matches the caller.

Decomposition, for O(P + D) routing: TTFT and the tail depend on the prefill worker only (the link is
the pair of deployments, alike across a homogeneous pool: compute prefill parts once per decode
deployment); the wait and the steps depend on the decode worker and on when the KV arrives, which
the router takes from one prefill part (`earliest_prefill`) for every decode worker, so the decode
parts depend on the decode worker only. `best_pair` uses that.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace
from operator import itemgetter
from typing import Iterable, Sequence

from hardware.perf import (Deployment, Speculative, TokenStep, chunk_step_time, kv_transfer_time, prefill_time,
                           token_step)
from orchestrator.core.arrivals import OVERTAKE_HORIZON_S, joined
from orchestrator.core.correction import Corrections, ttft_key
from orchestrator.core.queueplan import QueuedPrompt, QueuePlan, locate, plan_queue
from orchestrator.core.request import SLATarget


def _positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")


def _count(name: str, value: int, low: int) -> None:
    if not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True, slots=True)
class PredictRequest:
    """The request as the predictor sees it (targets in seconds; `from_sla` converts from ms)."""

    prompt_tokens: int  # tokens, >= 1
    max_tokens: int  # output tokens including the first (sampled by the prefill), >= 1
    ttft_s: float  # seconds, TTFT target (finite, > 0)
    tpot_s: float  # seconds, TPOT target (finite, > 0)
    priority: int = 0  # the prefill batcher's priority (higher runs first)

    def __post_init__(self) -> None:
        _count("prompt_tokens", self.prompt_tokens, 1)
        _count("max_tokens", self.max_tokens, 1)
        _positive("ttft_s", self.ttft_s)
        _positive("tpot_s", self.tpot_s)

    @classmethod
    def from_sla(cls, prompt_tokens: int, max_tokens: int, sla: SLATarget) -> PredictRequest:
        _positive("ttft_ms", sla.ttft_ms)
        _positive("tpot_ms", sla.tpot_ms)
        return cls(prompt_tokens, max_tokens, sla.ttft_ms / 1e3, sla.tpot_ms / 1e3, sla.priority)


@dataclass(frozen=True, slots=True)
class PrefillState:
    """One prefill worker at `now`: its deployment, batcher settings, queue and batch in progress."""

    worker_id: str
    dep: Deployment
    token_budget: int  # tokens per batch (PrefillBatcher.token_budget)
    max_batch: int  # prompts per batch (PrefillBatcher.max_batch)
    queue: tuple[QueuedPrompt, ...] = ()  # waiting prompts, in the order they were added
    busy_until_s: float = 0.0  # seconds (epoch of now): predicted end of the batch in progress; <= now: idle
    slowdown: float = 1.0  # factor on batch times (PerfParams.corun_slowdown_prefill on a shared host)
    # (TTFT target, perf-model prefill seconds per second arriving here lately: recent, long-run)
    # (orchestrator/core/arrivals.py)
    arrivals: tuple[tuple[float, float, float], ...] = ()
    busy_bound_s: float | None = None  # seconds: that end at the corrections' quantile (None: busy_until_s)
    # the queue's batches: plan_queue(dep, queue, token_budget, max_batch, slowdown), computed here unless a
    # caller that keeps it up to date as the queue changes passes it (the simulator: queueplan.append_last)
    plan: QueuePlan | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        _count("token_budget", self.token_budget, 1)
        _count("max_batch", self.max_batch, 1)
        if not math.isfinite(self.busy_until_s):
            raise ValueError(f"busy_until_s: must be finite, got {self.busy_until_s!r}")
        if self.busy_bound_s is None:
            object.__setattr__(self, "busy_bound_s", self.busy_until_s)
        elif not (self.busy_until_s <= self.busy_bound_s < math.inf):
            raise ValueError(f"busy_bound_s: must be finite and >= busy_until_s, got {self.busy_bound_s!r}")
        _positive("slowdown", self.slowdown)
        if self.plan is None:
            object.__setattr__(self, "plan", plan_queue(self.dep, self.queue, self.token_budget, self.max_batch,
                                                        self.slowdown))


@dataclass(frozen=True, slots=True)
class DecodeState:
    """One decode worker at `now`: the sequences that will share its steps, and its room."""

    worker_id: str
    dep: Deployment
    batch: int  # sequences running, waiting or with KV pending there (all will share the steps)
    ctx_sum: int  # tokens, total cached context of those sequences
    max_batch: int  # sequences per step (Scheduler.max_batch)
    free_kv_tokens: int  # tokens of free KV blocks
    tpot_targets: tuple[tuple[float, int], ...] = ()  # per TPOT target among those sequences, ascending:
    # (target seconds, the fewest steps, max_tokens - 1, of a sequence there with it); () when none has one
    slowdown: float = 1.0  # factor on step times (PerfParams.corun_slowdown_decode on a shared host)
    spec: Speculative | None = None  # speculative decoding, as the simulator's DecodeUnit
    draft: Deployment | None = None
    remaining: tuple[tuple[int, int], ...] = ()  # (steps left, KV tokens held) of each running sequence,
    # ascending: when batch slots and KV free up
    incoming: tuple[tuple[float, int, int, int], ...] = ()  # (seconds until its KV arrives, KV tokens it has
    # yet to reserve, steps it will run, KV tokens it then holds) of each request placed here and not
    # arrived (counted in `batch`), ascending
    local_busy_s: float = 0.0  # perf-model seconds of the local prefills placed here and not yet done
    stall_fraction: float = 0.0  # share of its recent time spent in local prefills (orchestrator/core/stall.py)
    chunk_tokens: int = 0  # local prefills ride its steps, this many prompt tokens a step (0: whole, between steps)
    local_tokens: int = 0  # prompt tokens of the local prefills placed here and not yet prefilled
    arriving: tuple[float, float] = (0.0, 0.0)  # (sequences placed here per second lately, their mean steps):
    # those still to be placed will join the steps too (orchestrator/core/arrivals.py DecodeArrivals)
    step_now_s: float = field(init=False, repr=False, compare=False)  # seconds, a step of all the sequences
    # counted in `batch` (those a newcomer decoding here will share with); 0: none
    reserving: int = field(init=False, repr=False, compare=False)  # tokens the incoming requests have yet to reserve
    token_step: TokenStep = field(init=False, repr=False, compare=False)  # its perf-model step (step_s)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reserving", sum(x[1] for x in self.incoming))
        _count("batch", self.batch, 0)
        _count("ctx_sum", self.ctx_sum, 0)
        _count("max_batch", self.max_batch, 1)
        _count("free_kv_tokens", self.free_kv_tokens, 0)
        _count("chunk_tokens", self.chunk_tokens, 0)
        _count("local_tokens", self.local_tokens, 0)
        for target, steps in self.tpot_targets:
            if not (target > 0) or steps < 1:  # NaN fails too; inf allowed (no constraint)
                raise ValueError(f"tpot_targets: each (target seconds > 0, steps >= 1), got "
                                 f"{(target, steps)!r}")
        _positive("slowdown", self.slowdown)
        if not (0.0 <= self.local_busy_s < math.inf):
            raise ValueError(f"local_busy_s: must be finite and >= 0, got {self.local_busy_s!r}")
        if len(self.arriving) != 2 or not all(0.0 <= x < math.inf for x in self.arriving):
            raise ValueError(f"arriving: must be (rate >= 0, mean steps >= 0), finite, got {self.arriving!r}")
        if not (0.0 <= self.stall_fraction < 1.0):
            raise ValueError(f"stall_fraction: must be in [0, 1), got {self.stall_fraction!r}")
        object.__setattr__(self, "token_step", token_step(self.dep, self.spec, self.draft))
        object.__setattr__(self, "step_now_s", self.step_s(min(self.batch, self.max_batch), self.ctx_sum)
                           if self.batch else 0.0)

    def start_at_s(self, need_tokens: int, arrival_s: float, step_s: float) -> float | None:
        """Seconds from now when a newcomer whose KV arrives `arrival_s` from now and needs `need_tokens` of
        KV (prompt + max_tokens) can start, taking `step_s` seconds per step: at its arrival when it
        then has a batch slot and that room (what the sequences finished by then gave back, less what
        the incoming ones that arrived took); else it queues behind the others and starts when enough
        of the sequences there have finished (None: not even when all have: no room)."""
        if self.batch < self.max_batch and self.has_room_now(need_tokens):
            return arrival_s  # room even once everyone placed here has arrived: the same answer, sooner
        free, finish = self.free_kv_tokens, [(steps * step_s, held) for steps, held in self.remaining]
        arrived = 0
        for eta, reserve, steps, held in self.incoming:
            if eta > arrival_s:
                break
            free -= reserve
            finish.append((eta + steps * step_s, held))
            arrived += 1
        finish.sort()
        k = 0
        while k < len(finish) and finish[k][0] <= arrival_s:
            free += finish[k][1]
            k += 1
        slots = self.batch - len(self.incoming) + arrived - k - self.max_batch + 1  # to free after it arrives
        if slots <= 0 and free >= need_tokens:
            return arrival_s
        for n, (t, held) in enumerate(finish[k:], 1):
            free += held
            if n >= slots and free >= need_tokens:
                return t
        return None

    def has_room_now(self, need_tokens: int) -> bool:
        """KV room for `need_tokens` now, even once every request placed here has reserved its own."""
        return self.free_kv_tokens - self.reserving >= need_tokens

    def has_room_until(self, need_tokens: int, until_s: float) -> bool:
        """KV room for `need_tokens` held from now until `until_s` seconds from now, once the requests
        placed here whose KV is predicted to arrive by then have reserved their own; those arriving
        later find it given back. A local prefill holds its blocks from its placement to its last token.
        Left out: requests whose predicted arrival has passed (`incoming` eta 0). When they come is not
        known (they are held up in a prefill queue), and reserving for them shut the local path for as
        long as they were late, which sent every prompt to the prefill pool and made them later still:
        in the simulator, a burst became a jam. One that comes while this request holds the room waits
        for it there (the simulator's refused handoff) or fails over to another pair (live)."""
        hi = bisect.bisect_right(self.incoming, until_s, key=itemgetter(0))
        return self.free_kv_tokens - sum(x[1] for x in self.incoming[self._first_due():hi]) >= need_tokens

    def _first_due(self) -> int:
        """Index in `incoming` (ascending) of the first request whose predicted arrival is still to
        come: those before it are overdue (eta 0). O(log n)."""
        return bisect.bisect_right(self.incoming, 0.0, key=itemgetter(0))

    def sharing(self, start_s: float, window_s: float, overdue: bool = True) -> float:
        """Mean number of sequences that share the steps of a newcomer decoding over [start_s, start_s +
        window_s) seconds from now (at most max_batch - 1): of those counted here, each running one until
        it finishes (`remaining`, at step_now_s's pace), each incoming one from its arrival for its
        steps, the rest (waiting) throughout; and those still to be placed here (`arriving`, from now,
        each for its mean steps). window_s = 0: the count at start_s. overdue=False leaves out the
        incoming ones whose predicted arrival has passed (eta 0: held up, when is not known), for a
        window too short to expect them in."""
        step, end = self.step_now_s, start_s + window_s
        rate, steps = self.arriving
        future = joined(rate, steps * (step or self.step_s(1, 0)), start_s, end) if rate else 0.0
        # incoming ones arriving after the window share none of it (ascending: cut them off, O(log n))
        cut = bisect.bisect_right(self.incoming, end if window_s > 0 else start_s, key=itemgetter(0))
        lo = 0 if overdue else self._first_due()
        spans = [(0.0, r * step) for r, _ in self.remaining] + [(eta, eta + n * step)
                                                                 for eta, _, n, _ in self.incoming[lo:cut]]
        rest = max(0, self.batch - len(self.remaining) - len(self.incoming))
        if window_s <= 0:
            n = rest + future + sum(1 for a, z in spans if a <= start_s < z)
        else:
            n = rest + future + sum(max(0.0, min(z, end) - max(a, start_s)) for a, z in spans) / window_s
        return min(float(n), self.max_batch - 1.0)

    def step_in_flight_s(self) -> float:
        """Perf-model seconds of the step running now: the running sequences only (0: none run)."""
        if not self.remaining:
            return 0.0
        return self.step_s(min(len(self.remaining), self.max_batch), sum(held for _, held in self.remaining))

    def steps_left_mean(self) -> float:
        """Mean steps the running sequences have left (>= 1; 1 when none run)."""
        if not self.remaining:
            return 1.0
        return max(1.0, sum(r for r, _ in self.remaining) / len(self.remaining))

    def admits(self, need_tokens: int, arrival_s: float = 0.0) -> bool:
        """A batch slot and KV room for `need_tokens`, at `arrival_s` or predictably later (DecodePart.fits)."""
        return self.start_at_s(need_tokens, arrival_s, self.step_now_s) is not None

    def step_s(self, batch: int, ctx_sum: float) -> float:
        """Perf-model seconds per emitted token per sequence (the simulator's DecodeUnit times its steps
        with the same token_step_time), stretched by the local prefills that take `stall_fraction` of
        the worker's time."""
        return self.token_step(batch, ctx_sum) * self.slowdown / (
            1.0 - self.stall_fraction)

    def chunk_s(self) -> float:
        """Perf-model seconds a local prefill's chunk adds to each step it rides (hardware/perf.py)."""
        return chunk_step_time(self.dep, self.chunk_tokens) * self.slowdown


# The per-decision records below (and queueplan.Slot, router.Placement) are slotted but not frozen: a
# frozen dataclass's __init__ sets each field through object.__setattr__, about 4x the cost, and a decision
# builds some twenty of them (bench/router.py, 64 + 64 workers: p50 51 -> 47 us). Treat them as values.
@dataclass(slots=True)
class Estimate:
    point_s: float  # seconds, median-corrected prediction
    bound_s: float  # seconds, at the corrections' quantile

    def __add__(self, other: Estimate) -> Estimate:
        return Estimate(self.point_s + other.point_s, self.bound_s + other.bound_s)

    def scale(self, k: float) -> Estimate:
        return Estimate(self.point_s * k, self.bound_s * k)


ZERO = Estimate(0.0, 0.0)


@dataclass(slots=True)
class PrefillPart:
    """The prefill-side part for one request on one prefill worker (towards one decode deployment)."""

    worker_id: str
    batch: int  # index of its batch in the queue (0: the next to start)
    queue_wait: Estimate  # seconds until its batch starts (the batch in progress as given, uncorrected)
    prefill: Estimate  # seconds of its own batch
    transfer: Estimate  # seconds of exposed KV transfer after the batch (layer-wise overlap)
    ttft: Estimate  # seconds, the TTFT as defined above, times the "ttft" correction
    tail: Estimate  # seconds counted in the TPOT numerator (the transfer, or zero)
    ttft_model_s: float  # seconds, the TTFT point from the parts alone: what the "ttft" correction observes against


@dataclass(slots=True)
class DecodePart:
    """The decode-side part for one request on one decode worker."""

    worker_id: str
    fits: bool  # a batch slot and KV room for prompt + max_tokens
    step: Estimate  # seconds per step the newcomer gets (DecodeState.sharing; context at the midpoint of its output)
    wait: Estimate  # seconds from its KV arriving to the next step boundary
    decode: Estimate  # seconds, wait + (max_tokens - 1) steps
    running_before_s: float  # seconds per step the sequences there get without it (point, same horizon)
    running_tpot: Estimate  # seconds per step they get with it (the step, plus a local prefill's stall spread)
    protects: bool  # no sequence there is pushed past its TPOT target (the shortest of each target: its stall)
    step_model_s: float  # seconds, its forecast step (point) before the "sharing" correction: what it observes against
    # (predicted TPOT bound, its target), seconds, of the sequence there nearest its target with the newcomer
    # (the shortest of its target); None when none is protected (an empty worker, or a full one it cannot reach)
    tightest: tuple[float, float] | None = None


@dataclass(slots=True)
class PairPrediction:
    prefill_worker: str
    decode_worker: str
    ttft: Estimate  # seconds
    tpot: Estimate  # seconds (0 for a one-token request)
    running_tpot: Estimate  # seconds, what the decode worker's sequences would get
    ok: bool  # fits, protects the running sequences, and both bounds meet the request's targets
    ttft_model_s: float  # PrefillPart.ttft_model_s
    tpot_wait_s: float  # seconds, the point of what its TPOT numerator holds besides its own steps: the KV
    # tail (when in TPOT) and the wait for its first step; the "tpot" correction observes against it plus
    # the time its steps took (Corrections docstring)
    step_model_s: float  # DecodePart.step_model_s


class Predictor:
    """The one latency predictor; `corrections` is updated by the caller with observe()."""

    def __init__(self, corrections: Corrections | None = None, first_token_after_transfer: bool = True):
        self.corrections = corrections if corrections is not None else Corrections()
        self.first_token_after_transfer = first_token_after_transfer

    def _scaled(self, worker: str, phase: str, seconds: float) -> Estimate:
        f = self.corrections.factors(worker, phase)
        return Estimate(seconds * f.point, seconds * f.bound)

    def prefill_part(self, req: PredictRequest, st: PrefillState, dst: Deployment, now: float) -> PrefillPart:
        """TTFT parts on `st` with the KV bound for a decode worker of deployment `dst`."""
        if not math.isfinite(now):
            raise ValueError(f"now: must be finite, got {now!r}")
        slot = locate(st.plan, st.dep, req.prompt_tokens, req.priority, now, st.token_budget, st.max_batch, st.slowdown,
                      req.ttft_s)
        own_s = prefill_time(st.dep, slot.lengths) * st.slowdown
        busy, busy_b = max(0.0, st.busy_until_s - now), max(0.0, st.busy_bound_s - now)
        corr, w = self.corrections, st.worker_id
        f, ft = corr.factors(w, "prefill"), corr.factors(w, "transfer")
        # plain floats, in the order the Estimate sums would add them (bit-identical, fewer objects)
        wait = Estimate(busy + slot.before_s * f.point, busy_b + slot.before_s * f.bound)
        if st.arrivals and wait.bound_s:
            wait = overtaken(wait, st.arrivals, req.ttft_s, f.point, f.bound)
        prefill = Estimate(own_s * f.point, own_s * f.bound)
        tr_s = kv_transfer_time(st.dep, dst, st.dep.model.kv_bytes(req.prompt_tokens, st.dep.kv_dtype), own_s)
        transfer = Estimate(tr_s * ft.point, tr_s * ft.bound)
        path = st.dep.hw.perf.request_path_s
        ttft_p, ttft_b = wait.point_s + prefill.point_s + path, wait.bound_s + prefill.bound_s + path
        tail = transfer
        if self.first_token_after_transfer:
            ttft_p, ttft_b, tail = ttft_p + transfer.point_s, ttft_b + transfer.bound_s, ZERO
        g = corr.factors(ttft_key(w, req.ttft_s), "ttft")
        return PrefillPart(w, slot.batch, wait, prefill, transfer, Estimate(ttft_p * g.point, ttft_b * g.bound), tail,
                           ttft_p)

    def decode_part(self, req: PredictRequest, st: DecodeState, arrival_s: float = 0.0,
                    hold: Estimate = ZERO, stall: Estimate = ZERO) -> DecodePart:
        """TPOT parts on `st` for KV arriving `arrival_s` seconds from now. The newcomer starts at its
        arrival, or without a batch slot or KV room when enough running sequences have finished (less
        the time it spends in prefill anyway); it shares its (max_tokens - 1) steps with the sequences
        there for as long as they overlap it (DecodeState.sharing: running ones finish, incoming ones
        arrive), at the context of the midpoint of its output (exact mean: perf is linear in ctx).
        Local prefills queued there whole (`local_busy_s`) that are still to run when its KV arrives
        hold up its first step. What the running sequences get with it (`running_tpot`, protected
        against their targets) is the step at today's batch plus one. `hold`: seconds per step the
        newcomer adds to theirs beyond that (its local prefill's chunk riding each step); `stall`:
        seconds it holds them up once (its local prefill run whole), which the shortest sequence of
        each target must absorb over its own steps, and the TPOT reported spreads over the mean steps
        left."""
        steps = req.max_tokens - 1
        half = (steps - 1) / 2 if steps > 0 else 0.0
        b, full = st.batch, st.batch >= st.max_batch
        need = req.prompt_tokens + req.max_tokens
        running = min(b, st.max_batch)
        f = self.corrections.factors(st.worker_id, "decode")
        # arrival at a uniformly random phase of the step in flight: mean half a step, q-quantile q steps
        wait_p, wait_b = 0.5 * st.step_now_s * f.point, self.corrections.quantile * st.step_now_s * f.bound
        start = st.start_at_s(need, arrival_s, st.step_now_s * f.point)
        fits = start is not None
        if fits and start > arrival_s:
            late = st.start_at_s(need, arrival_s, st.step_now_s * f.bound)
            wait_p, wait_b = wait_p + (start - arrival_s), wait_b + (late - arrival_s)
        if st.local_busy_s and not st.chunk_tokens:  # whole local prefills still queued at its arrival run first
            fl = self.corrections.factors(st.worker_id, "local_prefill")
            wait_p += max(0.0, st.local_busy_s * fl.point - arrival_s)
            wait_b += max(0.0, st.local_busy_s * fl.bound - arrival_s)
        others = st.sharing(start if fits else arrival_s, steps * (st.step_now_s or st.step_s(1, req.prompt_tokens)))
        own_ctx = (st.ctx_sum * others / b if b else 0.0) + req.prompt_tokens + (others + 1) * half
        own_s = st.step_s(others + 1, own_ctx)
        r = self.corrections.factors(st.worker_id, "sharing")  # the forecast's learned bias (Corrections)
        own = Estimate(own_s * f.point * r.point, own_s * f.bound * r.bound)
        before_s = st.step_s(running, st.ctx_sum + running * half) if b else 0.0
        # a full batch does not grow: its sequences keep their step, but a stall still reaches them
        with_s = before_s if full else st.step_s(b + 1, st.ctx_sum + req.prompt_tokens + (running + 1) * half)
        # the whole TPOT as observed against these parts: seconds added per step (Corrections.offsets)
        g = self.corrections.offsets(st.worker_id, "tpot")
        per_step_b = with_s * f.bound + hold.bound_s + g.bound_s  # what each of them gets, before the stall
        spread = 1.0 / st.steps_left_mean()
        protected = Estimate(max(0.0, with_s * f.point + hold.point_s + g.point_s + stall.point_s * spread),
                             max(0.0, per_step_b + stall.bound_s * spread))
        tightest = None
        if not (b == 0 or (full and not hold.bound_s and not stall.bound_s)):
            for target, n in st.tpot_targets:
                got = max(0.0, per_step_b + stall.bound_s / n)
                if tightest is None or got / target > tightest[0] / tightest[1]:
                    tightest = (got, target)
        protects = tightest is None or tightest[0] <= tightest[1]
        step = Estimate(max(0.0, own.point_s + g.point_s), max(0.0, own.bound_s + g.bound_s))
        return DecodePart(st.worker_id, fits, step, Estimate(wait_p, wait_b),
                          Estimate(wait_p + step.point_s * steps, wait_b + step.bound_s * steps),
                          max(0.0, before_s * f.point + g.point_s), protected, protects, own_s * f.point, tightest)

    def local_parts(self, req: PredictRequest, st: DecodeState) -> tuple[PrefillPart, DecodePart]:
        """Both parts of prefilling `req` on the decode worker itself (module docstring); the decode part
        is not `fits` unless its KV has room there from now to its last token (its blocks are reserved
        at placement; DecodeState.has_room_until)."""
        f = self.corrections.factors(st.worker_id, "decode")
        # it starts at the end of the step running now (a uniformly random phase of it), which is the
        # running sequences' alone: the incoming ones have not joined it
        in_flight = st.step_in_flight_s()
        step_wait = Estimate(0.5 * in_flight * f.point, self.corrections.quantile * in_flight * f.bound)
        if st.chunk_tokens and (st.batch > len(st.incoming) or (st.local_tokens and st.incoming)):
            # its chunks ride the steps after those of the prompts placed before it, while sequences decode
            # there (those running, and those placed there once they join: the local prefills before it
            # among them, so with one of those queued it rides even though nothing decodes yet); what is
            # left then runs whole. The steps it rides are those of the sequences there during its chunks
            # (DecodeState.sharing over that window), not of every one counted there: an incoming one held
            # up in a prefill queue is not in them
            c, tokens = st.chunk_tokens, st.local_tokens + req.prompt_tokens
            hold = self._scaled(st.worker_id, "local_prefill", st.chunk_s())
            need = -(-tokens // c)
            riding = max(1.0, st.sharing(0.0, need * (st.step_now_s + hold.point_s), overdue=False))
            step = self._scaled(st.worker_id, "decode", st.token_step(riding, st.ctx_sum * riding / st.batch)
                                * st.slowdown) + hold
            busy = max(max((r for r, _ in st.remaining), default=0),
                       max((eta / step.point_s + n for eta, _, n, _ in st.incoming), default=0))
            ride = min(need, math.ceil(busy)) if st.remaining or st.incoming else need
            rest = tokens - ride * c
            done = step.scale(ride) + (self._scaled(st.worker_id, "local_prefill", prefill_time(st.dep, [rest]))
                                       if rest > 0 else ZERO)
            prefill = done.scale(req.prompt_tokens / tokens)  # its share; the rest is the prompts before it
            wait = step_wait + done + prefill.scale(-1.0)
            stall = ZERO
        else:  # whole, between two steps: every sequence there stalls once, by the local prefills queued
            # before it and its own (what they must absorb with it), spread over the steps it has left
            queued = self._scaled(st.worker_id, "local_prefill", st.local_busy_s)
            wait = step_wait + queued
            prefill = self._scaled(st.worker_id, "local_prefill", prefill_time(st.dep, [req.prompt_tokens]))
            hold, stall = ZERO, queued + prefill
        path = st.dep.hw.perf.request_path_s
        ttft = wait + prefill + Estimate(path, path)
        g = self.corrections.factors(ttft_key(st.worker_id, req.ttft_s), "ttft")
        pp = PrefillPart(st.worker_id, 0, wait, prefill, ZERO, Estimate(ttft.point_s * g.point, ttft.bound_s * g.bound),
                         ZERO, ttft.point_s)
        dp = self.decode_part(req, st, kv_arrival_s(pp), hold=hold, stall=stall)
        if not st.has_room_until(req.prompt_tokens + req.max_tokens, completion_key(req, pp, dp)):
            dp = replace(dp, fits=False)
        return pp, dp

    @staticmethod
    def combine(req: PredictRequest, pp: PrefillPart, dp: DecodePart) -> PairPrediction:
        """The pair's prediction from its two parts (O(1))."""
        steps = req.max_tokens - 1
        k = 1.0 / steps if steps else 0.0  # (tail + decode).scale(k), one Estimate
        tpot = Estimate((pp.tail.point_s + dp.decode.point_s) * k, (pp.tail.bound_s + dp.decode.bound_s) * k) if (
            steps) else ZERO
        ok = (dp.fits and dp.protects and pp.ttft.bound_s <= req.ttft_s and tpot.bound_s <= req.tpot_s)
        return PairPrediction(pp.worker_id, dp.worker_id, pp.ttft, tpot, dp.running_tpot, ok, pp.ttft_model_s,
                              pp.tail.point_s + dp.wait.point_s, dp.step_model_s)

    def predict(self, req: PredictRequest, p: PrefillState, d: DecodeState, now: float) -> PairPrediction:
        """One pair, from the states (convenience; routers should use the parts)."""
        pp = self.prefill_part(req, p, d.dep, now)
        return self.combine(req, pp, self.decode_part(req, d, kv_arrival_s(pp)))


def overtaken(wait: Estimate, arrivals: tuple[tuple[float, float, float], ...], ttft_s: float, point: float,
              bound: float, horizon_s: float = OVERTAKE_HORIZON_S) -> Estimate:
    """A queue wait lengthened by the prompts that will arrive during it with a tighter TTFT target and
    so run first (earliest deadline first): a target tighter by d seconds overtakes for the first d
    seconds of the wait. `arrivals`: (target, recent load, long-run load), the PrefillState's, in
    prefill seconds per second: the recent load for the first `horizon_s` seconds of the wait
    (arrivals.OVERTAKE_HORIZON_S), the long-run load beyond; `point`, `bound`: the prefill correction's
    factors. One step of W = W0 + the work they bring in min(W, d), from W* = the wait under the
    total loads (each capped at 0.9: the bound stays finite)."""
    out = []
    for w0, k in ((wait.point_s, point), (wait.bound_s, bound)):
        tighter = [(ttft_s - t, near * k, far * k) for t, near, far in arrivals if t < ttft_s]
        if not tighter:
            return wait
        near, far = min(0.9, sum(x for _, x, _ in tighter)), min(0.9, sum(y for _, _, y in tighter))
        w = w0 / (1.0 - near)
        if w > horizon_s:  # W* = W0 + near x horizon + far x (W* - horizon)
            w = (w0 + (near - far) * horizon_s) / (1.0 - far)
        out.append(w0 + sum(x * min(w, d, horizon_s) + y * max(0.0, min(w, d) - horizon_s) for d, x, y in tighter))
    return Estimate(*out)


def fewest_steps(sequences: Iterable[tuple[float, int]]) -> tuple[tuple[float, int], ...]:
    """DecodeState.tpot_targets from each sequence's (TPOT target seconds, steps): the fewest steps per
    target, ascending by target."""
    fewest: dict[float, int] = {}
    for target, steps in sequences:
        if steps < fewest.get(target, steps + 1):
            fewest[target] = steps
    return tuple(sorted(fewest.items()))


def incoming_at(placed: Iterable[tuple[float, int, int, int]], now: float) -> tuple[tuple[float, int, int, int], ...]:
    """DecodeState.incoming at `now` of requests placed on a decode worker, each given as (predicted KV
    arrival on the clock of `now`, KV tokens yet to reserve, steps it will run, KV tokens it then holds)."""
    return tuple(sorted((max(0.0, eta - now), *rest) for eta, *rest in placed))


def kv_arrival_s(pp: PrefillPart) -> float:
    """Seconds from now until the request's KV is at the decode worker (point): when its wait for a
    decode slot or KV room starts to count."""
    return pp.ttft.point_s + pp.tail.point_s


def earliest_prefill(req: PredictRequest, prefill: Sequence[PrefillPart]) -> PrefillPart | None:
    """The prefill part `best_pair` ranks first, ignoring the decode side: the earliest KV arrival
    (bound) among those meeting the TTFT target. Decode parts for `best_pair` are computed with its
    `kv_arrival_s`: a later arrival only shortens the decode-side wait, so that is conservative."""
    ok = [p for p in prefill if p.ttft.bound_s <= req.ttft_s]
    return min(ok, key=lambda v: (v.ttft.bound_s + v.tail.bound_s, v.worker_id)) if ok else None


def completion_key(req: PredictRequest, pp: PrefillPart, dp: DecodePart) -> float:
    """Seconds from arrival to the last token, at the bound: the rule `best_pair` minimises."""
    return pp.ttft.bound_s + pp.tail.bound_s + dp.decode.bound_s


def best_pair(req: PredictRequest, prefill: Sequence[PrefillPart],
              decode: Sequence[DecodePart]) -> tuple[PrefillPart, DecodePart] | None:
    """The pair with the earliest predicted completion (bound) among those `combine` calls ok, in O(P + D).

    Exact: every feasible pair has decode.bound >= that of the best feasible decode worker d*, and a
    prefill worker feasible with some d is feasible with d* (TPOT = (tail + decode) / (n - 1)), so
    the optimum is d* with the best prefill worker that meets TTFT and fits d*'s TPOT budget.
    All parts must be computed towards the same decode deployment. Ties: lowest worker ids.
    """
    steps = req.max_tokens - 1
    ds = [d for d in decode if d.fits and d.protects]
    if not ds:
        return None
    d = min(ds, key=lambda v: (v.decode.bound_s, v.worker_id))
    inv = 1.0 / steps if steps else 0.0  # the same arithmetic as combine()
    ps = [p for p in prefill if p.ttft.bound_s <= req.ttft_s
          and (not steps or (p.tail.bound_s + d.decode.bound_s) * inv <= req.tpot_s)]
    if not ps:
        return None
    return min(ps, key=lambda v: (v.ttft.bound_s + v.tail.bound_s, v.worker_id)), d
