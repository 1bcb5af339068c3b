"""The event loop: arrivals -> Router.place -> prefill unit -> KV transfer -> decode unit.

The router decides with the live code (orchestrator/core/router.py and its predictor) on the units'
states; the predictor's corrections observe each prefill batch and decode segment, as live. A
request carries its class's targets (SimRequest.sla, else SimConfig.sla); the prefill batcher
orders by its deadline and priority, decode preemption takes the lowest priority first.

Events: arrival, prefill batch done, KV ready at the decode unit, decode segment end, local prefill
done (a prompt the router placed `local` is prefilled by its decode unit: units.py). With
`colocated`, prefill unit i and decode unit i are one replica (no transfer; prefill first, a
running decode segment is cut at the next step when prompts arrive). A request's KV blocks are
reserved when its prefill batch starts, by the live admission rule (units.DecodeUnit.open); a
refused handoff sends its KV once blocks are freed.

Shared host (both pools on the `cpu` profile, not colocated: the live bench's prefill and decode
actors on one machine): a prefill batch that starts while a decode unit is stepping takes
PerfParams.corun_slowdown_prefill times longer, and decode steps run corun_slowdown_decode times
slower while a prefill batch runs (running segments are cut at the next step when that changes).
Both factors, and the request path latency added to the first and the last token, are measured on
the live stack by bench/serving_overheads.py (PerfParams; 1.0 / 0 for every other profile).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from decode.allocator import BlockAllocator
from decode.scheduler import DecodeSeq, Scheduler
from hardware.perf import Deployment, Speculative, kv_token_capacity, kv_transfer_time, prefill_time, token_step_time
from orchestrator.core.correction import TPOT_MIN_GAPS, Corrections, ttft_key
from orchestrator.core.predictor import Predictor
from orchestrator.core.request import SLATarget
from orchestrator.core.router import Placement, Rejection, RouteRequest, Router
from orchestrator.simulator.units import DecodeUnit, Handoff, PrefillUnit
from orchestrator.simulator.workload import SimRequest
from prefill.batcher import PrefillBatcher, PrefillItem

ARRIVAL, PREFILL_DONE, KV_READY, SEG_END, LOCAL_DONE = range(5)


@dataclass(frozen=True, slots=True)
class PoolSetup:
    dep: Deployment
    replicas: int
    max_batch: int
    token_budget: int = 4096  # prefill: prompt tokens per batch
    block_tokens: int = 16  # decode: KV block size
    kv_capacity_tokens: int = 0  # decode: 0 = what fits next to the weights (hardware/perf.py)


@dataclass(frozen=True, slots=True)
class SimConfig:
    prefill: PoolSetup
    decode: PoolSetup
    sla: SLATarget
    router_policy: str = "sla"
    speculative: Speculative | None = None
    draft: Deployment | None = None
    colocated: bool = False  # baseline: prefill unit i and decode unit i are one replica
    reject: bool = True  # False: the sla policy places what it would reject (on its best-effort pair)
    quantile: float = 0.9  # the predictor's confidence (Corrections.quantile)
    local_prefill_max_tokens: int = 0  # the router's conditional disaggregation (0: off; not with colocated)
    local_prefill_chunk_tokens: int = 0  # a local prefill rides the decode steps, this many tokens a step (0: whole)


@dataclass(slots=True)
class Trace:
    """Per-request timestamps (seconds; NaN when a phase did not happen)."""

    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    prefill_start: np.ndarray
    first_token: np.ndarray
    kv_ready: np.ndarray
    admitted: np.ndarray
    finish: np.ndarray
    rejected: np.ndarray  # bool
    kv_wait: np.ndarray  # seconds a handoff refused at open waited for KV blocks after its prefill
    ttft_target: np.ndarray  # ms, each request's targets
    tpot_target: np.ndarray
    pred_ttft: np.ndarray  # seconds, the router's prediction at placement (point; NaN: rejected)
    pred_tpot: np.ndarray
    bound_ttft: np.ndarray  # seconds, at the predictor's quantile
    bound_tpot: np.ndarray

    def sla(self) -> SLATarget:
        """Elementwise targets (arrays of ms) for sla.ttft_met / tpot_met."""
        return SLATarget(self.ttft_target, self.tpot_target)

    def ttft_s(self) -> np.ndarray:
        """Time to first token per request (NaN: never prefilled)."""
        return self.first_token - self.arrival

    def tpot_s(self) -> np.ndarray:
        """Mean time per output token after the first (NaN: one-token request, or unfinished)."""
        return np.where(self.output > 1, (self.finish - self.first_token) / np.maximum(self.output - 1, 1), np.nan)

    def transfer_s(self) -> np.ndarray:
        """First token -> KV in the decode pool, less the wait for blocks (counted in decode_wait_s)."""
        return self.kv_ready - self.first_token - self.kv_wait

    def decode_wait_s(self) -> np.ndarray:
        """Waiting on the decode side: for KV blocks (refused handoffs), then for a batch slot."""
        return self.admitted - self.kv_ready + self.kv_wait


def _trace(reqs: list[SimRequest], sla: list[SLATarget]) -> Trace:
    n = len(reqs)
    nan = lambda: np.full(n, np.nan)  # noqa: E731
    return Trace(np.array([r.arrival_s for r in reqs]), np.array([r.prompt_tokens for r in reqs]),
                 np.array([r.output_tokens for r in reqs]), nan(), nan(), nan(), nan(), nan(),
                 np.zeros(n, dtype=bool), np.zeros(n), np.array([s.ttft_ms for s in sla], dtype=float),
                 np.array([s.tpot_ms for s in sla], dtype=float), nan(), nan(), nan(), nan())


@dataclass(slots=True)
class _Run:
    """The state of one run, made before the first event."""

    reqs: list[SimRequest]
    sla: list[SLATarget]  # each request's targets
    trace: Trace
    index: dict[str, int]  # request id given to the policies -> request index
    dest: np.ndarray  # (n,) decode unit of each placed request
    prefill_dt: np.ndarray  # (n,) seconds of its prefill batch (overlaps the transfer)
    prefill_end: np.ndarray  # (n,) when its prefill batch ended (NaN: not yet)
    opened: np.ndarray  # (n,) bool: its KV blocks are reserved (handoff admitted)
    ttft_model: np.ndarray  # (n,) seconds, Placement.ttft_model_ms: the "ttft" correction's prediction
    tpot_wait: np.ndarray  # (n,) seconds, Placement.tpot_wait_ms: with its steps' time, the "tpot" correction's
    step_model: np.ndarray  # (n,) seconds, Placement.step_model_ms: the "sharing" correction's
    heap: list = field(default_factory=list)  # (time, seq, kind, a, b) events
    n_events: int = 0
    end: float = 0.0


def _new_run(reqs: list[SimRequest], default: SLATarget) -> _Run:
    n = len(reqs)
    sla = [r.sla or default for r in reqs]
    return _Run(reqs, sla, _trace(reqs, sla), {str(i): i for i in range(n)}, np.full(n, -1),
                np.zeros(n), np.full(n, np.nan), np.zeros(n, dtype=bool), np.full(n, np.nan), np.full(n, np.nan),
                np.full(n, np.nan))


class Simulator:
    """One run of `SimConfig` over a list of requests; `run()` returns the filled `Trace`."""

    def __init__(self, cfg: SimConfig):
        self.cfg = cfg
        pf, dc = cfg.prefill, cfg.decode
        self.prefill = [PrefillUnit(i, pf.dep, PrefillBatcher(pf.token_budget, pf.max_batch))
                        for i in range(pf.replicas)]
        cap = dc.kv_capacity_tokens or kv_token_capacity(dc.dep)
        if cap < dc.block_tokens:
            raise ValueError(f"decode pool: no room for KV next to the weights of {dc.dep.model.name} "
                             f"on {dc.dep.chips} x {dc.dep.hw.name}")
        self.decode = []
        for i in range(dc.replicas):
            alloc = BlockAllocator(cap // dc.block_tokens, dc.block_tokens)
            self.decode.append(DecodeUnit(i, dc.dep, alloc, Scheduler(alloc, dc.max_batch),
                                          cfg.speculative, cfg.draft, chunk_tokens=cfg.local_prefill_chunk_tokens))
        self._prefill_by_id = {u.uid: u for u in self.prefill}
        self._decode_by_id = {u.uid: u for u in self.decode}
        # the simulator releases the first token when the prefill batch ends (report.py's TTFT)
        self.predictor = Predictor(Corrections(cfg.quantile), first_token_after_transfer=False)
        if cfg.colocated and cfg.local_prefill_max_tokens:
            raise ValueError("local_prefill_max_tokens: a colocated replica prefills locally already; set it to 0")
        self.router = Router(cfg.router_policy, self.predictor, cfg.reject, cfg.local_prefill_max_tokens)
        self.shared_host = (not cfg.colocated and pf.dep.hw.kind == "cpu" and dc.dep.hw.kind == "cpu")
        self._run = _new_run([], cfg.sla)

    @property
    def end(self) -> float:
        """Time of the last event of the run."""
        return self._run.end

    @property
    def reqs(self) -> list[SimRequest]:
        return self._run.reqs

    def _push(self, t: float, kind: int, a: int, b=None) -> None:
        self._run.n_events += 1
        heapq.heappush(self._run.heap, (t, self._run.n_events, kind, a, b))

    def run(self, reqs: list[SimRequest]) -> Trace:
        self._run = run = _new_run(reqs, self.cfg.sla)
        for i, r in enumerate(reqs):
            self._push(r.arrival_s, ARRIVAL, i)
        while run.heap:
            t, _, kind, a, b = heapq.heappop(run.heap)
            run.end = t
            if kind == ARRIVAL:
                self._arrive(t, a)
            elif kind == PREFILL_DONE:
                self._prefill_done(t, a, b)
            elif kind == KV_READY:
                self._kv_ready(t, a, b)
            elif kind == SEG_END and self.decode[a].seg is not None and self.decode[a].seg.version == b:
                self._segment_end(t, a)
            elif kind == LOCAL_DONE:
                self._local_done(t, a, b)
        return run.trace

    # -- prefill -----------------------------------------------------------------------------
    def _arrive(self, now: float, i: int) -> None:
        run, r, sla = self._run, self.reqs[i], self._run.sla[i]
        route = RouteRequest(str(i), r.prompt_tokens, r.output_tokens, sla)
        place = self.router.place(route, [u.view() for u in self.prefill], [u.view(now) for u in self.decode], now)
        if isinstance(place, Rejection):
            run.trace.rejected[i] = True
            return
        self._record(i, place)
        if place.local:
            return self._arrive_local(now, i, self._decode_by_id[place.decode_worker].index)
        p = self._prefill_by_id[place.prefill_worker].index
        d = run.dest[i] = p if self.cfg.colocated else self._decode_by_id[place.decode_worker].index
        if r.output_tokens > 1:
            unit = self.decode[d]
            unit.incoming[i] = (now + place.predicted_ttft_ms / 1e3, r.prompt_tokens + 1, r.output_tokens - 1,
                                r.prompt_tokens + r.output_tokens)
            unit.incoming_tokens += r.prompt_tokens
            unit.add_target(now, sla.tpot_ms / 1e3, r.output_tokens - 1)
        self.prefill[p].add(PrefillItem(str(i), r.prompt_tokens, now, sla.priority, sla.ttft_ms / 1e3))
        self._try_prefill(now, p)

    def _arrive_local(self, now: float, i: int, d: int) -> None:
        """Request i is prefilled by decode unit d: its blocks are reserved now; it runs after the step in flight."""
        run, r, unit = self._run, self.reqs[i], self.decode[d]
        run.dest[i] = d
        unit.add_local(i, r.prompt_tokens)
        run.opened[i] = True
        if r.output_tokens > 1:
            unit.incoming[i] = (now + run.trace.pred_ttft[i], 0, r.output_tokens - 1, r.prompt_tokens + r.output_tokens)
            unit.incoming_tokens += r.prompt_tokens
            unit.add_target(now, run.sla[i].tpot_ms / 1e3, r.output_tokens - 1)
        if unit.seg is not None:
            # the prefill runs (or its chunks start riding) at the next step boundary, as live
            if not unit.seg.chunk_s and unit.truncate(now, force=True):
                self._push(unit.end_time(), SEG_END, d, unit.seg.version)
            return
        self._next_work(now, d)

    def _start_local(self, now: float, d: int) -> bool:
        """Start decode unit d's next local prefill if it is free; True when one started."""
        unit = self.decode[d]
        got = unit.begin_local(now)
        if got is None:
            return False
        i, dt = got
        self._run.trace.prefill_start[i], self._run.prefill_dt[i] = now, dt
        model_s = prefill_time(unit.dep, [self.reqs[i].prompt_tokens - unit.head_done])
        self.predictor.corrections.observe(unit.uid, "local_prefill", dt, model_s)
        self._push(now + dt, LOCAL_DONE, d, i)
        return True

    def _next_work(self, now: float, d: int) -> None:
        """Decode unit d is free: its next local prefill, else its next segment; chunked local prefills
        ride the segment instead, and run whole only when no sequence can step."""
        if self.decode[d].chunk_tokens:
            self._try_decode(now, d)
            if self.decode[d].seg is None:
                self._start_local(now, d)
        elif not self._start_local(now, d):  # queued local prefills run back to back, as live
            self._try_decode(now, d)

    def _local_done(self, now: float, d: int, i: int) -> None:
        """Decode unit d's whole local prefill of request i ended."""
        self.decode[d].end_local(now)
        self._prefilled_locally(now, d, i)
        self._next_work(now, d)

    def _prefilled_locally(self, now: float, d: int, i: int) -> None:
        """Decode unit d prefilled request i: its first token is out, its sequence joins (no transfer)."""
        unit, run, r = self.decode[d], self._run, self.reqs[i]
        path = unit.dep.hw.perf.request_path_s
        run.trace.first_token[i] = now + path
        run.prefill_end[i] = run.trace.kv_ready[i] = now
        self.predictor.corrections.observe(ttft_key(unit.uid, run.sla[i].ttft_ms / 1e3), "ttft",
                                           now + path - run.trace.arrival[i], run.ttft_model[i])
        if r.output_tokens <= 1:
            run.trace.finish[i] = now + path
            unit.alloc.release(str(i))
        else:
            del unit.incoming[i]
            unit.incoming_tokens -= r.prompt_tokens
            unit.sched.add(DecodeSeq(str(i), r.prompt_tokens, [0], r.output_tokens, priority=run.sla[i].priority))

    def _record(self, i: int, place: Placement) -> None:
        tr = self._run.trace
        self._run.ttft_model[i] = place.ttft_model_ms / 1e3
        self._run.tpot_wait[i] = place.tpot_wait_ms / 1e3
        self._run.step_model[i] = place.step_model_ms / 1e3
        tr.pred_ttft[i], tr.pred_tpot[i] = place.predicted_ttft_ms / 1e3, place.predicted_tpot_ms / 1e3
        tr.bound_ttft[i], tr.bound_tpot[i] = place.ttft_bound_ms / 1e3, place.tpot_bound_ms / 1e3

    def _try_prefill(self, now: float, p: int) -> None:
        unit, run = self.prefill[p], self._run
        if unit.busy:
            return
        if self.cfg.colocated and self.decode[p].seg is not None:
            if self.decode[p].truncate(now):
                self._push(self.decode[p].end_time(), SEG_END, p, self.decode[p].seg.version)
            return  # prefill starts when the segment ends
        slow = 1.0
        if self.shared_host and any(u.seg is not None for u in self.decode):
            slow = unit.dep.hw.perf.corun_slowdown_prefill
        batch, dt = unit.start(now, slow)
        if not batch:
            return
        model_s = prefill_time(unit.dep, [it.n_tokens for it in batch])
        self.predictor.corrections.observe(unit.uid, "prefill", dt, model_s)
        self._retime_decode(now)
        for it in batch:  # the batch opens its handoffs as it starts, as the live PrefillWorker does
            i = run.index[it.request_id]
            run.trace.prefill_start[i], run.prefill_dt[i] = now, dt
            if self.reqs[i].output_tokens > 1:
                self._open(i, self.decode[run.dest[i]].open(Handoff(i, self.reqs[i].prompt_tokens)))
        self._push(now + dt, PREFILL_DONE, p, batch)

    def _open(self, i: int, opened: bool) -> None:
        self._run.opened[i] = opened
        if opened:  # its blocks are reserved in the allocator now
            unit = self.decode[self._run.dest[i]]
            eta, _, steps, held = unit.incoming[i]
            unit.incoming[i] = (eta, 0, steps, held)

    def _prefill_done(self, now: float, p: int, batch: list[PrefillItem]) -> None:
        unit, run = self.prefill[p], self._run
        unit.done()
        self._retime_decode(now)
        path = unit.dep.hw.perf.request_path_s  # measured live frontend/Ray/gRPC latency (cpu profile)
        corr = self.predictor.corrections
        for it in batch:
            i = run.index[it.request_id]
            run.trace.first_token[i] = now + path
            run.prefill_end[i] = now
            corr.observe(ttft_key(unit.uid, it.ttft_s), "ttft", now + path - run.trace.arrival[i], run.ttft_model[i])
            if self.reqs[i].output_tokens <= 1:
                run.trace.finish[i] = now + path
            elif run.opened[i]:
                self._send_kv(now, i, run.prefill_dt[i])
        self._try_prefill(now, p)
        if self.cfg.colocated:
            self._try_decode(now, p)

    def _send_kv(self, now: float, i: int, overlap_s: float) -> None:
        """Move request i's KV (prefill ended, blocks reserved) to its decode unit."""
        d = int(self._run.dest[i])
        if self.cfg.colocated:
            return self._push(now, KV_READY, d, i)
        src = self.cfg.prefill.dep
        kv = src.model.kv_bytes(self.reqs[i].prompt_tokens, src.kv_dtype)
        self._push(now + kv_transfer_time(src, self.decode[d].dep, kv, overlap_s), KV_READY, d, i)

    def _retime_decode(self, now: float) -> None:
        """Shared host: set decode units' co-run slowdown from the prefill units' state."""
        if not self.shared_host:
            return
        busy = any(u.busy for u in self.prefill)
        for d, unit in enumerate(self.decode):
            slow = unit.dep.hw.perf.corun_slowdown_decode if busy else 1.0
            if slow == unit.slowdown:
                continue
            unit.slowdown = slow
            if unit.seg is not None and unit.truncate(now, force=True):
                self._push(unit.end_time(), SEG_END, d, unit.seg.version)

    # -- decode ------------------------------------------------------------------------------
    def _kv_ready(self, now: float, d: int, i: int) -> None:
        unit, r = self.decode[d], self.reqs[i]
        self._run.trace.kv_ready[i] = now
        del unit.incoming[i]
        unit.incoming_tokens -= r.prompt_tokens
        seq = DecodeSeq(str(i), r.prompt_tokens, [0], r.output_tokens, priority=self._run.sla[i].priority)
        unit.sched.add(seq)  # it holds its blocks
        if unit.seg is not None and unit.sched.n_waiting and unit.truncate(now):
            self._push(unit.end_time(), SEG_END, d, unit.seg.version)
        self._try_decode(now, d)

    def _retry_refused(self, now: float, unit: DecodeUnit) -> None:
        """Freed blocks: open refused handoffs in order; those already prefilled send their KV now."""
        run = self._run
        for h in unit.retry_refused():
            self._open(h.request, True)
            if not np.isnan(run.prefill_end[h.request]):
                run.trace.kv_wait[h.request] = now - run.prefill_end[h.request]
                self._send_kv(now, h.request, 0.0)

    def _try_decode(self, now: float, d: int) -> None:
        unit = self.decode[d]
        if unit.seg is not None or (self.cfg.colocated and self.prefill[d].busy):
            return
        seg = unit.begin(now)
        if seg is None:
            return
        if seg.chunk_s:  # its first chunk: the local prefill starts
            head = unit.local[0][0]
            if np.isnan(self._run.trace.prefill_start[head]):
                self._run.trace.prefill_start[head] = seg.start
        admitted = self._run.trace.admitted
        for s in seg.plan.batch:
            i = self._run.index[s.request_id]
            if np.isnan(admitted[i]):
                admitted[i] = seg.start
        self._push(unit.end_time(), SEG_END, d, seg.version)

    def _segment_end(self, now: float, d: int) -> None:
        unit = self.decode[d]
        path = unit.dep.hw.perf.request_path_s  # the last token reaches the client the way the first did
        s = unit.seg
        model_s = token_step_time(unit.dep, s.batch, s.ctx0 + s.batch * (s.steps - 1) / 2, unit.spec, unit.draft)
        self.predictor.corrections.observe(unit.uid, "decode", s.step_s - s.chunk_s, model_s)
        finished, prefilled = unit.finish_segment(now)
        run = self._run
        for f in finished:
            i = run.index[f.request_id]
            run.trace.finish[i] = now + path
            unit.drop_target(run.sla[i].tpot_ms / 1e3, self.reqs[i].output_tokens - 1)
            if self.reqs[i].output_tokens > TPOT_MIN_GAPS:  # as the live engine; its steps from its first's
                # start to its last's end, the live worker's TokenChunk.stepping_s
                gaps = self.reqs[i].output_tokens - 1
                self.predictor.corrections.observe_decode(
                    unit.uid, (now + path - run.trace.first_token[i]) / gaps, now - run.trace.admitted[i], gaps,
                    run.tpot_wait[i], run.step_model[i], unit.arrivals.seen_window(run.trace.arrival[i]))
        if prefilled is not None:
            self._prefilled_locally(now, d, prefilled)
        self._retry_refused(now, unit)
        if unit.chunk_tokens and unit.local:
            return self._next_work(now, d)
        if self._start_local(now, d):
            return
        if self.cfg.colocated and len(self.prefill[d].batcher):
            self._try_prefill(now, d)
            if self.prefill[d].busy:
                return
        self._try_decode(now, d)
