"""What the engine knows of its workers: their last load reports, what it has placed on them since, their health.

The router decides on the predictor's worker states (orchestrator/core/predictor.py), built here
(`WorkerLedger.views`) from the workers' last load reports plus what the engine has sent them since:
the prompts it placed on a prefill worker and not yet seen finish are that worker's queue (the batch
in progress as the worker reported it), the requests it placed on a decode worker and not yet seen
there are counted in its batch, and the TPOT targets of its requests on a decode worker (each with
the fewest steps a request there has, over which a local prefill's stall spreads) are what a
placement must not break; the rate at which it has been given sequences lately is how many more the
router expects to join a newcomer's steps (DecodeState.arriving). Each load report's batches and
steps, and each request's KV transfer tail, feed the predictor's corrections. A worker whose load call fails is unhealthy (reported, never routed
to) until it answers again.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

import structlog

from decode.worker import DecodeLoad
from hardware.perf import Deployment, chunk_step_time, kv_transfer_time, prefill_time, token_step_time
from orchestrator.core.arrivals import ArrivalMeter, DecodeArrivals, per_token_s
from orchestrator.core.correction import Corrections
from orchestrator.core.predictor import DecodeState, PrefillState, fewest_steps, incoming_at
from orchestrator.core.queueplan import QueuedPrompt
from orchestrator.core.router import DecodeView, Placement, PrefillView
from orchestrator.core.sla import SLATarget
from orchestrator.core.stall import StallMeter
from orchestrator.serving.workers import Pools
from prefill.worker import PrefillLoad, PrefillResult

log = structlog.get_logger("engine")

CPU_SHARES_KEPT = 4096  # per worker, the newest (WorkerLedger.cpu_shares)
LOAD_TIMEOUT_S = 2.0  # a worker whose load() takes longer (hung, or restarting) counts as unhealthy


@dataclass(slots=True)
class DecodePending:
    """What the engine placed on a decode worker that its load report may not show yet."""

    # attempt id -> (predicted KV arrival, monotonic s; KV tokens it has yet to reserve there; steps it
    # will run; KV tokens it then holds), until the decode worker has it (DecodeState.incoming)
    incoming: dict[str, tuple[float, int, int, int]] = field(default_factory=dict)
    prompt_tokens: int = 0  # of those
    tpot_targets: dict[str, tuple[float, int]] = field(default_factory=dict)  # attempt id -> (TPOT target
    # seconds, steps: max_tokens - 1), while it is live there
    local: dict[str, tuple[float, int]] = field(default_factory=dict)  # attempt id -> perf-model seconds and
    # prompt tokens of its local prefill, until it returns
    stalls: StallMeter = field(default_factory=StallMeter)  # its local prefills' share of its time
    arrivals: DecodeArrivals = field(default_factory=DecodeArrivals)  # the sequences placed on it lately


class WorkerLedger:
    """Per worker: its last load report, the attempts placed on it that the report may not show yet, its
    health, and the CPU shares its compute got. Attempts are counted from `count` until the worker
    reports them (`prefilled`, `local_done`, `seen`) or the engine gives them up (`forget`)."""

    def __init__(self, pools: Pools, corrections: Corrections, perf: Deployment, decode_max_batch: int,
                 prefill_token_budget: int, prefill_max_batch: int, local_chunk_tokens: int):
        self.pools, self.corrections, self.perf = pools, corrections, perf
        self.decode_max_batch = decode_max_batch
        self.prefill_token_budget, self.prefill_max_batch = prefill_token_budget, prefill_max_batch
        self.local_chunk_tokens = local_chunk_tokens
        self.prefill_loads: dict[str, PrefillLoad] = {}  # worker id -> last reported load
        self.decode_loads: dict[str, DecodeLoad] = {}
        self._load_at: dict[str, float] = {}  # worker id -> monotonic time its last load arrived
        self._queued: dict[str, dict[str, QueuedPrompt]] = {w: {} for w in pools.prefill}  # placed, not prefilled
        # prefill work placed on each, by TTFT target
        self._arrivals = {w: ArrivalMeter(per_token_s(perf, prefill_token_budget)) for w in pools.prefill}
        started = time.monotonic()
        self._pending = {w: DecodePending(stalls=StallMeter(start_s=started)) for w in pools.decode}
        # worker id -> the share of a core its recent compute got (decode steps, prefill batches): how much
        # of what they took was waiting for a core others held (StepRecord.cpu_share); read by bench
        self.cpu_shares = {w: deque(maxlen=CPU_SHARES_KEPT) for w in (*pools.prefill, *pools.decode)}
        self.unhealthy: set[str] = set()  # workers whose last call failed: reported, never routed to

    # -- load reports --------------------------------------------------------------------

    async def refresh_all(self) -> None:
        """Every worker's load once, together (at start, so the first request has views)."""
        workers = {**self.pools.prefill, **self.pools.decode}
        await asyncio.gather(*(self.refresh(w, h) for w, h in workers.items()))

    async def refresh(self, worker: str, handle) -> None:
        """Ask one worker for its load (LOAD_TIMEOUT_S) and take in what it reports."""
        try:
            async with asyncio.timeout(LOAD_TIMEOUT_S):  # not wait_for: it can swallow a cancel (Engine.stop)
                answer = await handle.load()
        except Exception as e:  # a dead, hung or restarting actor
            answer = e
        if worker in self.pools.prefill:
            self._record(self.prefill_loads, worker, answer)
            return
        if not self._record(self.decode_loads, worker, answer):
            return
        if answer.kv_target:
            self.pools.kv_targets[worker] = answer.kv_target  # a restarted actor listens on a new port
        now = time.monotonic()
        for step in answer.steps:  # a step a local prefill's chunk rode: both, fused
            step_s = token_step_time(self.perf, step.batch, step.context_tokens)
            chunk_s = chunk_step_time(self.perf, step.chunk_tokens)
            self.corrections.observe(worker, "decode", step.seconds, step_s + chunk_s)
            self.cpu_shares[worker].append(step.cpu_share)
            if step.chunk_tokens:  # the chunk's share of the step: time the local prefill took from the sequences
                self._pending[worker].stalls.add(now, step.seconds * chunk_s / (step_s + chunk_s))
        for tokens, seconds in answer.local_prefills:
            self.corrections.observe(worker, "local_prefill", seconds, prefill_time(self.perf, [tokens]))
            self._pending[worker].stalls.add(now, seconds)

    def _record(self, loads: dict, worker: str, answer) -> bool:
        """Keep a worker's load report; a failed call marks it unhealthy (it keeps its last load for
        GetServerInfo). True when the worker answered."""
        if isinstance(answer, BaseException):
            self.mark_unhealthy(worker, answer)
            return False
        loads[worker] = answer
        self._load_at[worker] = time.monotonic()
        if worker in self.unhealthy:
            self.unhealthy.discard(worker)
            log.info("worker healthy again", worker=worker)
        return True

    def mark_unhealthy(self, worker: str, error: BaseException) -> None:
        if worker not in self.unhealthy:
            self.unhealthy.add(worker)
            log.warning("worker unhealthy: no new requests go to it", worker=worker, error=repr(error))

    def observe_prefill(self, worker: str, prompt_tokens: int, res: PrefillResult) -> None:
        """The batch's compute (once per batch: by its first prompt's result) and this prompt's KV tail."""
        dep = self.perf
        model_s = prefill_time(dep, res.batch_lengths)
        if res.first_in_batch:
            self.corrections.observe(worker, "prefill", res.prefill_ms / 1e3, model_s)
            self.cpu_shares[worker].append(res.cpu_share)
        kv = dep.model.kv_bytes(prompt_tokens, dep.kv_dtype)
        self.corrections.observe(worker, "transfer", res.transfer_tail_ms / 1e3,
                                 kv_transfer_time(dep, dep, kv, model_s))

    # -- what the engine placed since --------------------------------------------------------

    def count(self, key: str, placed: Placement, context_tokens: int, steps: int, sla: SLATarget, arrival_s: float,
              mid_stream: bool) -> None:
        """Count attempt `key` (`context_tokens` to prefill, up to `steps` tokens to generate) on `placed`'s
        workers until they report it."""
        pend, ctx, n = self._pending[placed.decode_worker], context_tokens, steps
        now = time.monotonic()
        if placed.local:
            pend.local[key] = (prefill_time(self.perf, [ctx]), ctx)
        elif mid_stream:  # a migration: the next token is due within a TPOT
            self._queued[placed.prefill_worker][key] = QueuedPrompt(ctx, now, sla.priority, sla.tpot_ms / 1e3)
        else:
            self._queued[placed.prefill_worker][key] = QueuedPrompt(ctx, arrival_s, sla.priority, sla.ttft_ms / 1e3)
            self._arrivals[placed.prefill_worker].add(now, sla.ttft_ms / 1e3, ctx)
        pend.incoming[key] = (now + placed.predicted_ttft_ms / 1e3, ctx + 1, n - 1, ctx + n)
        pend.prompt_tokens += ctx
        if n > 1:
            pend.tpot_targets[key] = (sla.tpot_ms / 1e3, n - 1)
            pend.arrivals.add(now, n - 1)

    def seen_window(self, decode_worker: str, at_s: float) -> bool:
        """The worker's arrivals meter had watched a whole window by `at_s` (DecodeArrivals.seen_window)."""
        return self._pending[decode_worker].arrivals.seen_window(at_s)

    def prefilled(self, key: str, placed: Placement, committed: bool) -> None:
        """Its prefill worker is done with it; `committed`: its KV is in the decode worker's blocks."""
        self._queued[placed.prefill_worker].pop(key, None)
        if committed:
            pend = self._pending[placed.decode_worker]
            eta, _, steps, held = pend.incoming[key]
            pend.incoming[key] = (eta, 0, steps, held)

    def local_done(self, key: str, decode_worker: str) -> None:
        """Its local prefill has returned (ran or not)."""
        self._pending[decode_worker].local.pop(key, None)

    def seen(self, key: str, decode_worker: str, context_tokens: int) -> None:
        """The decode worker has it: its load reports count it from now."""
        pend = self._pending[decode_worker]
        del pend.incoming[key]
        pend.prompt_tokens -= context_tokens

    def forget(self, key: str, placed: Placement, prefill_pending: bool) -> None:
        """Stop counting attempt `key` (already `seen` by its decode worker, or never to be)."""
        if prefill_pending:
            self._queued[placed.prefill_worker].pop(key, None)
        pend = self._pending[placed.decode_worker]
        pend.tpot_targets.pop(key, None)
        pend.local.pop(key, None)

    def queued_prompts(self) -> int:
        return sum(len(q) for q in self._queued.values())

    # -- the router's views --------------------------------------------------------------

    def views(self, now: float | None = None) -> tuple[list[PrefillView], list[DecodeView]]:
        """The router's views at `now` (monotonic seconds): the workers' last reported loads plus what
        the engine has sent them since."""
        now = time.monotonic() if now is None else now
        pf = [self._prefill_view(w, l, now) for w, l in self.prefill_loads.items()]
        dc = []
        for w, l in self.decode_loads.items():
            pend = self._pending[w]
            incoming = incoming_at(pend.incoming.values(), now)
            state = DecodeState(w, self.perf, l.active + l.waiting + len(incoming),
                                l.context_tokens + pend.prompt_tokens,
                                self.decode_max_batch, l.free_tokens, fewest_steps(pend.tpot_targets.values()),
                                remaining=l.remaining, incoming=incoming,
                                local_busy_s=sum(s for s, _ in pend.local.values()),
                                stall_fraction=pend.stalls.fraction(now), chunk_tokens=self.local_chunk_tokens,
                                local_tokens=sum(n for _, n in pend.local.values()),
                                arriving=pend.arrivals.rate(now))
            dc.append(DecodeView(state, l.total_blocks * l.block_size, l.block_size, w not in self.unhealthy))
        return pf, dc

    def _prefill_view(self, w: str, load: PrefillLoad, now: float) -> PrefillView:
        """Queue: the prompts placed there and not prefilled, but the batch in progress as reported
        (still running while one of its prompts has not come back)."""
        queued = self._queued[w]
        running = {rid for rid in load.running if rid in queued}
        busy_until = busy_bound = 0.0
        if running:  # what it has left, given how long it has run (Corrections.remaining)
            elapsed = now - (self._load_at[w] - load.running_elapsed_s)
            left, left_b = self.corrections.remaining(w, "prefill", prefill_time(self.perf, load.running_lengths),
                                                      elapsed)
            busy_until, busy_bound = now + left, now + left_b
        queue = tuple(q for rid, q in queued.items() if rid not in running)
        state = PrefillState(w, self.perf, self.prefill_token_budget, self.prefill_max_batch, queue, busy_until,
                             arrivals=self._arrivals[w].loads(now), busy_bound_s=busy_bound)
        return PrefillView(state, sum(load.running_lengths) if running else 0, w not in self.unhealthy)
