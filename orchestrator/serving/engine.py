"""Drives one request through the pools: route, prefill + KV transfer, submit, stream tokens, finish.

Transport-free: the engine calls its workers through handles (orchestrator/serving/workers.py), and
the gRPC frontend and tests consume the event stream `Engine.generate` yields. Text comes from the
decode worker, which detokenizes every token (the first included) and stops on stop strings: a
first token that ends the request ends it there, at its submit, with no call of its own.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import structlog

from decode.worker import DecodeLoad
from model.finish import Failure, FinishReason
from orchestrator.client.types import Prediction, Timings
from orchestrator.core.request import Request, RequestState
from orchestrator.core.router import DecodeView, Placement, PrefillView, Rejection, RouteRequest, Router
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
    prefill_pending: bool = True  # counted in _pending_* until the worker reports it
    decode_pending: bool = True
    result: PrefillResult | None = None
    n_out: int = 0
    t_first: float | None = None  # monotonic time of its first chunk from the decode worker


class Engine:
    def __init__(self, pools: Pools, router: Router, decode_max_batch: int, kv_deadline_s: float = 30.0):
        self.pools = pools
        self.decode_max_batch = decode_max_batch
        self.router = router
        self.kv_deadline_s = kv_deadline_s
        self.prefill_loads: dict[str, PrefillLoad] = {}  # worker id -> last reported load
        self.decode_loads: dict[str, DecodeLoad] = {}
        self._pending_prefill_tokens: dict[str, int] = {w: 0 for w in pools.prefill}
        self._pending_decode: dict[str, int] = {w: 0 for w in pools.decode}
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
        for worker, answer in zip(self.pools.prefill, pf):
            self._record(self.prefill_loads, worker, answer)
        for worker, answer in zip(self.pools.decode, dc):
            if self._record(self.decode_loads, worker, answer) and answer.kv_target:
                self.pools.kv_targets[worker] = answer.kv_target  # a restarted actor listens on a new port

    def _record(self, loads: dict, worker: str, answer) -> bool:
        """Keep a worker's load report; a failed call marks it unhealthy (it keeps its last load for
        GetServerInfo). True when the worker answered."""
        if isinstance(answer, BaseException):
            self._mark_unhealthy(worker, answer)
            return False
        loads[worker] = answer
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

    def views(self) -> tuple[list[PrefillView], list[DecodeView]]:
        """The workers' last reported loads plus what this engine has sent them since."""
        pf = [PrefillView(w, l.queued_tokens + self._pending_prefill_tokens[w], l.tokens_per_s, w not in self.unhealthy)
              for w, l in self.prefill_loads.items()]
        dc = [DecodeView(w, l.active + l.waiting + self._pending_decode[w], self.decode_max_batch, l.free_tokens,
                         l.total_blocks * l.block_size, l.step_ms_if_added, w not in self.unhealthy)
              for w, l in self.decode_loads.items()]
        return pf, dc

    # -- one request ---------------------------------------------------------------------

    async def generate(self, req: Request) -> AsyncIterator[Event]:
        """Yield token events, then one final or error event. Closing the iteration early aborts.
        Every exit ends `req` (its state and finish reason)."""
        placed = self._route(req)
        if isinstance(placed, Failure):
            yield self._fail(req, placed, rejected=True)
            return
        run = self._admit(req, placed)
        try:
            res = await self._prefill(run)
            if req.request_id in self._aborted:  # the Abort RPC stopped the prefill, or came while it ran
                if res.ok:  # the decode side may have taken the KV after the abort reached it: release it
                    await self.pools.decode[placed.decode_worker].abort(req.request_id)
                yield self._final(run, FinishReason.ABORT)
                return
            if not res.ok:
                yield self._fail(req, Failure(res.error.code, f"prefill failed: {res.error.message}"))
                return
            chunks = await self._submit(run)
            while True:  # the decode stream: the first token, then one chunk per poll with news
                chunk = await chunks.get()
                run.t_first = run.t_first or time.monotonic()
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

    def _route(self, req: Request) -> Placement | Failure:
        pf_views, dc_views = self.views()
        placed = self.router.place(RouteRequest(req.request_id, req.prompt_tokens, req.sampling.max_tokens, req.sla),
                                   pf_views, dc_views, time.monotonic())
        return Failure(placed.code, placed.reason) if isinstance(placed, Rejection) else placed

    def _admit(self, req: Request, placed: Placement) -> _Run:
        self._live[req.request_id] = placed
        self._pending_prefill_tokens[placed.prefill_worker] += req.prompt_tokens
        self._pending_decode[placed.decode_worker] += 1
        return _Run(req, placed)

    async def _prefill(self, run: _Run) -> PrefillResult:
        """Prefill and KV transfer: resolves once the KV is committed on the decode worker, or failed."""
        req, placed = run.req, run.placed
        req.advance(RequestState.PREFILLING)
        run.result = await self.pools.prefill[placed.prefill_worker].prefill(PrefillJob(
            req.request_id, req.prompt_ids, req.sampling, self.pools.kv_targets[placed.decode_worker],
            self.kv_deadline_s, req.sla.priority))
        self._pending_prefill_tokens[placed.prefill_worker] -= req.prompt_tokens
        run.prefill_pending = False
        return run.result

    async def _submit(self, run: _Run) -> asyncio.Queue:
        """Hand the first token to the decode worker holding the KV; returns the request's chunk queue."""
        req, placed = run.req, run.placed
        req.advance(RequestState.TRANSFERRING)
        chunks = self._outputs[placed.decode_worker].subscribe(req.request_id)
        await self.pools.decode[placed.decode_worker].submit(req.request_id, run.result.first_token, req.sampling,
                                                             req.prompt_ids, self._owner)
        self._pending_decode[placed.decode_worker] -= 1
        run.decode_pending = False
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
        return FinalEvent(reason, req.prompt_tokens, run.n_out, timings, run.placed.prefill_worker,
                          run.placed.decode_worker)

    def _fail(self, req: Request, failure: Failure, rejected: bool = False) -> ErrorEvent:
        self._ended(req, FinishReason.ERROR, failure, rejected)
        return ErrorEvent(failure)

    @staticmethod
    def _ended(req: Request, reason: FinishReason, failure: Failure | None = None, rejected: bool = False,
               **fields) -> None:
        """Advance the request to its final state; the one log line of every request's end."""
        req.end(reason, failure, rejected)
        if req.failure is not None:
            fields.update(code=req.failure.code, error=req.failure.message)
        log.info("request ended", request_id=req.request_id, state=req.state.value, reason=req.finish_reason.value,
                 **fields)

    def _release(self, run: _Run) -> None:
        req, placed = run.req, run.placed
        if run.prefill_pending:
            self._pending_prefill_tokens[placed.prefill_worker] -= req.prompt_tokens
        if run.decode_pending:
            self._pending_decode[placed.decode_worker] -= 1
        self._outputs[placed.decode_worker].unsubscribe(req.request_id)
        self._live.pop(req.request_id, None)
        self._aborted.discard(req.request_id)

    async def _abort_everywhere(self, request_id: str, placed: Placement) -> None:
        await asyncio.gather(self.pools.prefill[placed.prefill_worker].abort(request_id),
                             self.pools.decode[placed.decode_worker].abort(request_id),
                             return_exceptions=True)

    async def abort(self, request_id: str) -> bool:
        """The Abort RPC: stop a live request on both pools; its stream ends with FinishReason.ABORT."""
        placed = self._live.get(request_id)
        if placed is None:
            return False
        self._aborted.add(request_id)
        await self._abort_everywhere(request_id, placed)
        return True
