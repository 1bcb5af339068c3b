"""The event loop: arrivals -> Router.place -> prefill unit -> KV transfer -> decode unit.

Events: arrival, prefill batch done, KV ready at the decode unit, decode segment end. With
`colocated`, prefill unit i and decode unit i are one replica (no transfer; prefill first, a
running decode segment is cut at the next step when prompts arrive).

Shared host (both pools on the `cpu` profile, not colocated: the live bench's prefill and decode
actors on one machine): a prefill batch that starts while a decode unit is stepping takes
PerfParams.corun_slowdown_prefill times longer, and decode steps run corun_slowdown_decode times
slower while a prefill batch runs (running segments are cut at the next step when that changes).
Both factors, and the request path latency added to the first and the last token, are measured on
the live stack by bench/serving_overheads.py (PerfParams; 1.0 / 0 for every other profile).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from decode.allocator import BlockAllocator
from decode.scheduler import DecodeSeq, Scheduler
from hardware.perf import Deployment, Speculative, kv_token_capacity, kv_transfer_time, prefill_time
from orchestrator.core.request import SLATarget
from orchestrator.core.router import Rejection, RouteRequest, Router
from orchestrator.simulator.units import DecodeUnit, PrefillUnit
from orchestrator.simulator.workload import SimRequest
from prefill.batcher import PrefillBatcher, PrefillItem

ARRIVAL, PREFILL_DONE, KV_READY, SEG_END = range(4)


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
    router_policy: str = "least_loaded"
    speculative: Speculative | None = None
    draft: Deployment | None = None
    colocated: bool = False  # baseline: prefill unit i and decode unit i are one replica


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

    def ttft_s(self) -> np.ndarray:
        """Time to first token per request (NaN: never prefilled)."""
        return self.first_token - self.arrival

    def tpot_s(self) -> np.ndarray:
        """Mean time per output token after the first (NaN: one-token request, or unfinished)."""
        return np.where(self.output > 1, (self.finish - self.first_token) / np.maximum(self.output - 1, 1), np.nan)


def _trace(reqs: list[SimRequest]) -> Trace:
    n = len(reqs)
    nan = lambda: np.full(n, np.nan)  # noqa: E731
    return Trace(np.array([r.arrival_s for r in reqs]), np.array([r.prompt_tokens for r in reqs]),
                 np.array([r.output_tokens for r in reqs]), nan(), nan(), nan(), nan(), nan(),
                 np.zeros(n, dtype=bool))


class Simulator:
    """One run of `SimConfig` over a list of requests; `run()` returns the filled `Trace`."""

    def __init__(self, cfg: SimConfig):
        self.cfg = cfg
        pf, dc = cfg.prefill, cfg.decode
        tps = pf.token_budget / prefill_time(pf.dep, [pf.token_budget])
        self.prefill = [PrefillUnit(f"p{i}", pf.dep, PrefillBatcher(pf.token_budget, pf.max_batch), tps)
                        for i in range(pf.replicas)]
        cap = dc.kv_capacity_tokens or kv_token_capacity(dc.dep)
        if cap < dc.block_tokens:
            raise ValueError(f"decode pool: no room for KV next to the weights of {dc.dep.model.name} "
                             f"on {dc.dep.chips} x {dc.dep.hw.name}")
        self.decode = []
        for i in range(dc.replicas):
            alloc = BlockAllocator(cap // dc.block_tokens, dc.block_tokens)
            self.decode.append(DecodeUnit(f"d{i}", dc.dep, alloc, Scheduler(alloc, dc.max_batch),
                                          cfg.speculative, cfg.draft))
        self.router = Router(cfg.router_policy)
        self.shared_host = (not cfg.colocated and pf.dep.hw.kind == "cpu" and dc.dep.hw.kind == "cpu")
        self._heap: list = []
        self._n = 0

    def _push(self, t: float, kind: int, a: int, b=None) -> None:
        self._n += 1
        heapq.heappush(self._heap, (t, self._n, kind, a, b))

    def run(self, reqs: list[SimRequest]) -> Trace:
        self.tr = tr = _trace(reqs)
        self.reqs = reqs
        for r in reqs:
            self._push(r.arrival_s, ARRIVAL, r.rid)
        self.end = 0.0
        while self._heap:
            t, _, kind, a, b = heapq.heappop(self._heap)
            self.end = t
            if kind == ARRIVAL:
                self._arrive(t, a)
            elif kind == PREFILL_DONE:
                self._prefill_done(t, a, b)
            elif kind == KV_READY:
                self._kv_ready(t, a, b)
            elif kind == SEG_END and self.decode[a].seg is not None and self.decode[a].seg.version == b:
                self._segment_end(t, a)
        return tr

    # -- prefill -----------------------------------------------------------------------------
    def _arrive(self, now: float, i: int) -> None:
        r = self.reqs[i]
        route = RouteRequest(str(i), r.prompt_tokens, r.output_tokens, self.cfg.sla)
        dviews = [u.view() for u in self.decode]
        place = self.router.place(route, [u.view() for u in self.prefill], dviews, now)
        if isinstance(place, Rejection):
            self.tr.rejected[i] = True
            return
        p = int(place.prefill_worker[1:])
        self._dest = getattr(self, "_dest", {})
        self._dest[i] = p if self.cfg.colocated else int(place.decode_worker[1:])
        self.prefill[p].batcher.add(PrefillItem(str(i), r.prompt_tokens, now))
        self._try_prefill(now, p)

    def _try_prefill(self, now: float, p: int) -> None:
        unit = self.prefill[p]
        if unit.busy:
            return
        if self.cfg.colocated and self.decode[p].seg is not None:
            if self.decode[p].truncate(now):
                self._push(self.decode[p].end_time(), SEG_END, p, self.decode[p].seg.version)
            return  # prefill starts when the segment ends
        slow = 1.0
        if self.shared_host and any(u.seg is not None for u in self.decode):
            slow = unit.dep.hw.perf.corun_slowdown_prefill
        batch, dt = unit.start(slow)
        if batch:
            self._retime_decode(now)
        for it in batch:
            self.tr.prefill_start[int(it.request_id)] = now
        if batch:
            self._push(now + dt, PREFILL_DONE, p, (batch, dt))

    def _prefill_done(self, now: float, p: int, payload) -> None:
        batch, dt = payload
        unit = self.prefill[p]
        unit.busy, unit.running_tokens = False, 0
        self._retime_decode(now)
        path = unit.dep.hw.perf.request_path_s  # measured live frontend/Ray/gRPC latency (cpu profile)
        for it in batch:
            i = int(it.request_id)
            self.tr.first_token[i] = now + path
            r = self.reqs[i]
            if r.output_tokens <= 1:
                self.tr.finish[i] = now + path
                continue
            d = self._dest.pop(i)
            if self.cfg.colocated:
                self._push(now, KV_READY, d, i)
            else:
                kv = self.cfg.prefill.dep.model.kv_bytes(r.prompt_tokens, self.cfg.prefill.dep.kv_dtype)
                self._push(now + kv_transfer_time(unit.dep, self.decode[d].dep, kv, dt), KV_READY, d, i)
        self._try_prefill(now, p)
        if self.cfg.colocated:
            self._try_decode(now, p)

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
        unit = self.decode[d]
        self.tr.kv_ready[i] = now
        unit.pending.append(i)
        self._admit_pending(unit)
        if unit.seg is not None and unit.sched.n_waiting and unit.truncate(now):
            self._push(unit.end_time(), SEG_END, d, unit.seg.version)
        self._try_decode(now, d)

    def _admit_pending(self, unit: DecodeUnit) -> None:
        """Hand transferred KV to the scheduler once its blocks can be allocated (FIFO)."""
        while unit.pending:
            i = unit.pending[0]
            r = self.reqs[i]
            if not unit.can_take(r.prompt_tokens + 1):
                return
            unit.pending.pop(0)
            unit.alloc.allocate(str(i), r.prompt_tokens + 1)
            unit.sched.add(DecodeSeq(str(i), r.prompt_tokens, [0], r.output_tokens))

    def _try_decode(self, now: float, d: int) -> None:
        unit = self.decode[d]
        if unit.seg is not None or (self.cfg.colocated and self.prefill[d].busy):
            return
        seg = unit.begin(now)
        if seg is None:
            return
        for s in seg.plan.batch:
            i = int(s.request_id)
            if np.isnan(self.tr.admitted[i]):
                self.tr.admitted[i] = seg.start
        self._push(unit.end_time(), SEG_END, d, seg.version)

    def _segment_end(self, now: float, d: int) -> None:
        unit = self.decode[d]
        path = unit.dep.hw.perf.request_path_s  # the last token reaches the client the way the first did
        for f in unit.finish_segment():
            self.tr.finish[int(f.request_id)] = now + path
        self._admit_pending(unit)
        if self.cfg.colocated and len(self.prefill[d].batcher):
            self._try_prefill(now, d)
            if self.prefill[d].busy:
                return
        self._try_decode(now, d)
