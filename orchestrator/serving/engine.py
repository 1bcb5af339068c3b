"""Drives one request through the pools: route, prefill + KV transfer, submit, stream tokens, finish.

Transport-free: the engine calls its workers through handles (orchestrator/serving/workers.py), and
the gRPC frontend and tests consume the event stream `Engine.generate` yields. Text comes from the
decode worker, which detokenizes every token (the first included) and stops on stop strings: a
first token that ends the request ends it there, at its submit, with no call of its own.

The router decides on the predictor's worker states (orchestrator/core/predictor.py), built here
from the workers' last load reports plus what this engine has sent them since: the prompts it
placed on a prefill worker and not yet seen finish are that worker's queue (the batch in progress
as the worker reported it), the requests it placed on a decode worker and not yet seen there are
counted in its batch, and the tightest TPOT target among its requests on a decode worker is the
one a placement must not break. Each load report's batches and steps, and each request's KV
transfer tail, feed the predictor's corrections.

A request the router places with `local` (conditional disaggregation) is prefilled by its decode
worker itself (DecodeWorker.prefill_local): no prefill worker, no transfer. Until it returns it is
counted in that worker's local queue (DecodeState.local_busy_s); the local prefills each worker
reports feed the "local_prefill" correction and the worker's stall meter (orchestrator/core/stall.py).
"""
from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import structlog

from decode.worker import DecodeLoad
from kvtransfer.sink import KVRefused
from hardware.perf import Deployment, kv_transfer_time, prefill_time, token_step_time
from model.finish import Failure, FinishReason
from orchestrator.client.types import Prediction, Timings
from orchestrator.core.correction import ttft_key
from orchestrator.core.predictor import DecodeState, PrefillState, incoming_at
from orchestrator.core.queueplan import QueuedPrompt
from orchestrator.core.request import Request, RequestState
from orchestrator.core.router import DecodeView, Placement, PrefillView, Rejection, RouteRequest, Router
from orchestrator.core.stall import StallMeter
from orchestrator.serving.decode_outputs import DecodeOutputs
from orchestrator.serving.workers import Pools, WorkerUnavailable
from prefill.worker import PrefillJob, PrefillLoad, PrefillResult

log = structlog.get_logger("engine")

VIEW_REFRESH_S = 0.05
LOAD_TIMEOUT_S = 2.0  # a worker whose load() takes longer (hung, or restarting) counts as unhealthy


@dataclass(frozen=True, slots=True)
class TokenEvent:
    token_ids: list[int]
    text: str


@dataclass(frozen=True, slots=True)
class FinalEvent:
    finish_reason: FinishReason  # STOP, LENGTH or ABORT
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    prefill_worker: str
    decode_worker: str
    prediction: Prediction | None = None  # the router's, for the pair that served it


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    failure: Failure
    rejection: str = ""  # Rejection.kind when the router turned the request away, else ""


Event = TokenEvent | FinalEvent | ErrorEvent


@dataclass(slots=True)
class _Run:
    """One placed request in flight, and what the engine still counts against its workers."""

    req: Request
    placed: Placement
    prefill_pending: bool = True  # in its prefill worker's queue (_queued) until the prefill returns
    decode_pending: bool = True  # counted in _pending_decode until the decode worker has it
    result: PrefillResult | None = None
    n_out: int = 0
    t_first: float | None = None  # monotonic time of its first chunk from the decode worker
    chunks: asyncio.Queue | None = None  # a local prefill's chunk queue (subscribed before the prefill)


@dataclass(slots=True)
class _DecodePending:
    """What this engine placed on a decode worker that its load report may not show yet."""

    # request id -> (predicted KV arrival, monotonic s; KV tokens it has yet to reserve there; steps it
    # will run; KV tokens it then holds), until the decode worker has it (DecodeState.incoming)
    incoming: dict[str, tuple[float, int, int, int]] = field(default_factory=dict)
    prompt_tokens: int = 0  # of those
    tpot_targets: dict[str, float] = field(default_factory=dict)  # request id -> seconds, while it is live there
    local: dict[str, float] = field(default_factory=dict)  # request id -> perf-model seconds of its local prefill,
    # until it returns
    stalls: StallMeter = field(default_factory=StallMeter)  # its local prefills' share of its time


class Engine:
    def __init__(self, pools: Pools, router: Router, perf: Deployment, decode_max_batch: int,
                 prefill_token_budget: int = 4096, prefill_max_batch: int = 8, kv_deadline_s: float = 30.0):
        """`perf`: the live model on the cpu profile (orchestrator/serving/perfmodel.py); the batch
        settings are the workers' (cluster.yaml pools.*)."""
        self.pools = pools
        self.perf = perf
        self.decode_max_batch = decode_max_batch
        self.prefill_token_budget, self.prefill_max_batch = prefill_token_budget, prefill_max_batch
        self.router = router
        self.kv_deadline_s = kv_deadline_s
        self.prefill_loads: dict[str, PrefillLoad] = {}  # worker id -> last reported load
        self.decode_loads: dict[str, DecodeLoad] = {}
        self._load_at: dict[str, float] = {}  # worker id -> monotonic time its last load arrived
        self._queued: dict[str, dict[str, QueuedPrompt]] = {w: {} for w in pools.prefill}  # placed, not prefilled
        self._pending_decode = {w: _DecodePending() for w in pools.decode}
        self._live: dict[str, Placement] = {}
        self._aborted: set[str] = set()  # live requests an Abort RPC ended
        self.unhealthy: set[str] = set()  # workers whose last call failed: reported, never routed to
        self._refresher: asyncio.Task | None = None
        owner = f"engine-{uuid.uuid4().hex[:12]}"  # this engine's requests on the decode workers
        self._outputs = {w: DecodeOutputs(handle, owner) for w, handle in pools.decode.items()}
        self._owner = owner

    async def start(self) -> None:
        await self._refresh_views()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._refresher:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)  # ended, not left pending at exit
        await asyncio.gather(*(outputs.stop() for outputs in self._outputs.values()))

    # -- views for the router ------------------------------------------------------------

    async def _refresh_views(self) -> None:
        ask = lambda handle: asyncio.wait_for(handle.load(), LOAD_TIMEOUT_S)  # noqa: E731
        pf, dc = await asyncio.gather(
            asyncio.gather(*(ask(h) for h in self.pools.prefill.values()), return_exceptions=True),
            asyncio.gather(*(ask(h) for h in self.pools.decode.values()), return_exceptions=True))
        corr = self.router.predictor.corrections
        for worker, answer in zip(self.pools.prefill, pf):
            self._record(self.prefill_loads, worker, answer)
        for worker, answer in zip(self.pools.decode, dc):
            if not self._record(self.decode_loads, worker, answer):
                continue
            if answer.kv_target:
                self.pools.kv_targets[worker] = answer.kv_target  # a restarted actor listens on a new port
            for batch, ctx, seconds in answer.steps:
                corr.observe(worker, "decode", seconds, token_step_time(self.perf, batch, ctx))
            now = time.monotonic()
            for tokens, seconds in answer.local_prefills:
                corr.observe(worker, "local_prefill", seconds, prefill_time(self.perf, [tokens]))
                self._pending_decode[worker].stalls.add(now, seconds)

    def _record(self, loads: dict, worker: str, answer) -> bool:
        """Keep a worker's load report; a failed call marks it unhealthy (it keeps its last load for
        GetServerInfo). True when the worker answered."""
        if isinstance(answer, BaseException):
            self._mark_unhealthy(worker, answer)
            return False
        loads[worker] = answer
        self._load_at[worker] = time.monotonic()
        if worker in self.unhealthy:
            self.unhealthy.discard(worker)
            log.info("worker healthy again", worker=worker)
        return True

    def _mark_unhealthy(self, worker: str, error: BaseException) -> None:
        if worker not in self.unhealthy:
            self.unhealthy.add(worker)
            log.warning("worker unhealthy: no new requests go to it", worker=worker, error=repr(error))

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(VIEW_REFRESH_S)
            try:
                await self._refresh_views()
            except Exception:  # a bug here must not stop the refresh
                log.warning("load refresh failed", exc_info=True)

    def views(self, now: float | None = None) -> tuple[list[PrefillView], list[DecodeView]]:
        """The router's views at `now` (monotonic seconds): the workers' last reported loads plus what
        this engine has sent them since."""
        now = time.monotonic() if now is None else now
        pf = [self._prefill_view(w, l, now) for w, l in self.prefill_loads.items()]
        dc = []
        for w, l in self.decode_loads.items():
            pend = self._pending_decode[w]
            incoming = incoming_at(pend.incoming.values(), now)
            state = DecodeState(w, self.perf, l.active + l.waiting + len(incoming),
                                l.context_tokens + pend.prompt_tokens,
                                self.decode_max_batch, l.free_tokens, min(pend.tpot_targets.values(), default=math.inf),
                                remaining=l.remaining, incoming=incoming, local_busy_s=sum(pend.local.values()),
                                stall_fraction=pend.stalls.fraction(now))
            dc.append(DecodeView(state, l.total_blocks * l.block_size, l.block_size, w not in self.unhealthy))
        return pf, dc

    def _prefill_view(self, w: str, load: PrefillLoad, now: float) -> PrefillView:
        """Queue: the prompts placed there and not prefilled, but the batch in progress as reported
        (still running while one of its prompts has not come back)."""
        queued = self._queued[w]
        running = {rid for rid in load.running if rid in queued}
        busy_until = 0.0
        if running:
            f = self.router.predictor.corrections.factors(w, "prefill").point
            started = self._load_at[w] - load.running_elapsed_s
            busy_until = max(now, started + prefill_time(self.perf, load.running_lengths) * f)
        queue = tuple(q for rid, q in queued.items() if rid not in running)
        state = PrefillState(w, self.perf, self.prefill_token_budget, self.prefill_max_batch, queue, busy_until)
        return PrefillView(state, sum(load.running_lengths) if running else 0, w not in self.unhealthy)

    # -- one request ---------------------------------------------------------------------

    async def generate(self, req: Request) -> AsyncIterator[Event]:
        """Yield token events, then one final or error event. Closing the iteration early aborts.
        Every exit ends `req` (its state and finish reason)."""
        placed = self._route(req)
        if isinstance(placed, Rejection):
            yield self._fail(req, Failure(placed.code, placed.reason), rejected=True, kind=placed.kind)
            return
        run = self._admit(req, placed)
        try:
            res = await (self._prefill_here(run) if placed.local else self._prefill(run))
            if req.request_id in self._aborted:  # the Abort RPC stopped the prefill, or came while it ran
                if res.ok:  # the decode side may have taken the KV after the abort reached it: release it
                    await self.pools.decode[placed.decode_worker].abort(req.request_id)
                yield self._final(run, FinishReason.ABORT)
                return
            if not res.ok:
                yield self._fail(req, Failure(res.error.code, f"prefill failed: {res.error.message}"))
                return
            chunks = run.chunks if placed.local else await self._submit(run)
            while True:  # the decode stream: the first token, then one chunk per poll with news
                chunk = await chunks.get()
                if run.t_first is None:
                    run.t_first = time.monotonic()
                    self._observe_ttft(run)
                if chunk.token_ids:
                    run.n_out += len(chunk.token_ids)
                    yield TokenEvent(list(chunk.token_ids), "".join(chunk.texts))
                if chunk.finished:
                    break
            yield self._fail(req, chunk.error) if chunk.error else self._final(run, chunk.finish_reason)
        except (asyncio.CancelledError, GeneratorExit):
            if not req.state.terminal:  # the client went away before the end
                self._ended(req, FinishReason.ABORT, by="client")
                await self._abort_everywhere(req.request_id, placed)
            raise
        except WorkerUnavailable as e:  # the worker's process died or is unreachable: fail this request, keep serving
            self._mark_unhealthy(e.worker_id, e)
            await self._abort_everywhere(req.request_id, placed)
            yield self._fail(req, Failure("UNAVAILABLE", str(e)))
        finally:
            self._release(run)

    def _route(self, req: Request) -> Placement | Rejection:
        now = time.monotonic()
        pf_views, dc_views = self.views(now)
        return self.router.place(RouteRequest(req.request_id, req.prompt_tokens, req.sampling.max_tokens, req.sla),
                                 pf_views, dc_views, now)

    def _admit(self, req: Request, placed: Placement) -> _Run:
        self._live[req.request_id] = placed
        sla = req.sla
        pend, n = self._pending_decode[placed.decode_worker], req.sampling.max_tokens
        if placed.local:
            pend.local[req.request_id] = prefill_time(self.perf, [req.prompt_tokens])
        else:
            self._queued[placed.prefill_worker][req.request_id] = QueuedPrompt(req.prompt_tokens, req.arrival_s,
                                                                               sla.priority, sla.ttft_ms / 1e3)
        pend.incoming[req.request_id] = (req.arrival_s + placed.predicted_ttft_ms / 1e3, req.prompt_tokens + 1, n - 1,
                                         req.prompt_tokens + n)
        pend.prompt_tokens += req.prompt_tokens
        if n > 1:
            pend.tpot_targets[req.request_id] = sla.tpot_ms / 1e3
        return _Run(req, placed, prefill_pending=not placed.local)

    async def _prefill(self, run: _Run) -> PrefillResult:
        """Prefill and KV transfer: resolves once the KV is committed on the decode worker, or failed."""
        req, placed = run.req, run.placed
        req.advance(RequestState.PREFILLING)
        run.result = res = await self.pools.prefill[placed.prefill_worker].prefill(PrefillJob(
            req.request_id, req.prompt_ids, req.sampling, self.pools.kv_targets[placed.decode_worker],
            self.kv_deadline_s, req.sla.priority, req.sla.ttft_ms / 1e3))
        self._queued[placed.prefill_worker].pop(req.request_id, None)
        run.prefill_pending = False
        if res.ok:
            pend = self._pending_decode[placed.decode_worker]
            eta, _, steps, held = pend.incoming[req.request_id]
            pend.incoming[req.request_id] = (eta, 0, steps, held)  # its KV is committed in the pool's blocks
            if res.batch_lengths:
                self._observe_prefill(placed.prefill_worker, req.prompt_tokens, res)
        return res

    async def _prefill_here(self, run: _Run) -> PrefillResult:
        """Local prefill on the decode worker: resolves once the request is in its batch (its chunks then
        come to `run.chunks`), or failed; the same result as a prefill worker's, with no transfer."""
        req, w = run.req, run.placed.decode_worker
        req.advance(RequestState.PREFILLING)
        run.chunks = self._outputs[w].subscribe(req.request_id)
        try:
            got = await self.pools.decode[w].prefill_local(req.request_id, req.prompt_ids, req.sampling, self._owner,
                                                           req.sla.priority)
        except KVRefused as e:  # no room after all (a race with a handoff), or an id already live there
            run.result = PrefillResult(req.request_id, error=Failure(e.code, str(e)))
            return run.result
        finally:
            self._pending_decode[w].local.pop(req.request_id, None)
        error = None
        if got.ran:
            self._decode_seen(run)
            req.advance(RequestState.TRANSFERRING)  # nothing to transfer: its KV is in the pool already
            req.advance(RequestState.DECODING)
        elif req.request_id not in self._aborted:
            error = Failure("INTERNAL", "the decode worker's local prefill failed")
        run.result = PrefillResult(req.request_id, got.first_token, got.queued_ms, got.prefill_ms, error=error)
        return run.result

    def _observe_ttft(self, run: _Run) -> None:
        """The request's whole TTFT against the parts' prediction (the "ttft" correction)."""
        req, placed = run.req, run.placed
        self.router.predictor.corrections.observe(ttft_key(placed.prefill_worker, req.sla.ttft_ms / 1e3), "ttft",
                                                  run.t_first - req.arrival_s, placed.ttft_model_ms / 1e3)

    def _observe_prefill(self, worker: str, prompt_tokens: int, res: PrefillResult) -> None:
        """The batch's compute (once per batch: by its first prompt's result) and this prompt's KV tail."""
        corr, dep = self.router.predictor.corrections, self.perf
        model_s = prefill_time(dep, res.batch_lengths)
        if res.first_in_batch:
            corr.observe(worker, "prefill", res.prefill_ms / 1e3, model_s)
        kv = dep.model.kv_bytes(prompt_tokens, dep.kv_dtype)
        corr.observe(worker, "transfer", res.transfer_tail_ms / 1e3, kv_transfer_time(dep, dep, kv, model_s))

    async def _submit(self, run: _Run) -> asyncio.Queue:
        """Hand the first token to the decode worker holding the KV; returns the request's chunk queue."""
        req, placed = run.req, run.placed
        req.advance(RequestState.TRANSFERRING)
        chunks = self._outputs[placed.decode_worker].subscribe(req.request_id)
        await self.pools.decode[placed.decode_worker].submit(req.request_id, run.result.first_token, req.sampling,
                                                             req.prompt_ids, self._owner, req.sla.priority)
        self._decode_seen(run)
        req.advance(RequestState.DECODING)
        return chunks

    def _final(self, run: _Run, reason: FinishReason) -> FinalEvent:
        req, res, now = run.req, run.result, time.monotonic()
        t_first = run.t_first or now
        timings = Timings(
            queued_ms=res.queued_ms, prefill_ms=res.prefill_ms, transfer_ms=res.transfer_tail_ms,
            ttft_ms=(t_first - req.arrival_s) * 1e3, e2e_ms=(now - req.arrival_s) * 1e3,
            mean_tpot_ms=((now - t_first) * 1e3 / (run.n_out - 1)) if run.n_out > 1 else 0.0)
        self._ended(req, reason, tokens=run.n_out, ttft_ms=round(timings.ttft_ms, 1), e2e_ms=round(timings.e2e_ms, 1))
        p, q = run.placed, self.router.predictor.corrections.quantile
        prediction = Prediction(p.predicted_ttft_ms, p.predicted_tpot_ms, p.ttft_bound_ms, p.tpot_bound_ms, q)
        return FinalEvent(reason, req.prompt_tokens, run.n_out, timings, p.prefill_worker, p.decode_worker, prediction)

    def _fail(self, req: Request, failure: Failure, rejected: bool = False, kind: str = "") -> ErrorEvent:
        self._ended(req, FinishReason.ERROR, failure, rejected)
        return ErrorEvent(failure, kind)

    @staticmethod
    def _ended(req: Request, reason: FinishReason, failure: Failure | None = None, rejected: bool = False,
               **fields) -> None:
        """Advance the request to its final state; the one log line of every request's end."""
        req.end(reason, failure, rejected)
        if req.failure is not None:
            fields.update(code=req.failure.code, error=req.failure.message)
        log.info("request ended", request_id=req.request_id, state=req.state.value, reason=req.finish_reason.value,
                 **fields)

    def _decode_seen(self, run: _Run) -> None:
        """The decode worker has the request (its load reports count it from now)."""
        pend = self._pending_decode[run.placed.decode_worker]
        del pend.incoming[run.req.request_id]
        pend.prompt_tokens -= run.req.prompt_tokens
        run.decode_pending = False

    def _release(self, run: _Run) -> None:
        req, placed = run.req, run.placed
        if run.prefill_pending:
            self._queued[placed.prefill_worker].pop(req.request_id, None)
        if run.decode_pending:
            self._decode_seen(run)
        self._pending_decode[placed.decode_worker].tpot_targets.pop(req.request_id, None)
        self._outputs[placed.decode_worker].unsubscribe(req.request_id)
        self._live.pop(req.request_id, None)
        self._aborted.discard(req.request_id)

    async def _abort_everywhere(self, request_id: str, placed: Placement) -> None:
        workers = [self.pools.decode[placed.decode_worker]]
        if not placed.local:
            workers.append(self.pools.prefill[placed.prefill_worker])
        await asyncio.gather(*(w.abort(request_id) for w in workers), return_exceptions=True)

    async def abort(self, request_id: str) -> bool:
        """The Abort RPC: stop a live request on both pools; its stream ends with FinishReason.ABORT."""
        placed = self._live.get(request_id)
        if placed is None:
            return False
        self._aborted.add(request_id)
        await self._abort_everywhere(request_id, placed)
        return True
