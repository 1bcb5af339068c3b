"""Drives one request through the pools: route, prefill + KV transfer, submit, stream tokens, finish.

Transport-free: the engine calls its workers through handles (orchestrator/serving/workers.py), and
the gRPC frontend and tests consume the event stream `Engine.generate` yields. Text comes from the
decode worker, which detokenizes every token (the first included) and stops on stop strings: a
first token that ends the request ends it there, at its submit, with no call of its own.

The router decides on the views of the engine's `WorkerLedger` (orchestrator/serving/ledger.py): the
workers' last load reports plus what this engine has placed on them since, and their health. The
engine counts each attempt there from its placement until the workers report it or it is given up.

Failover. A request is placed again (the router, rejection off) when
- a worker of its pair dies: its calls fail (WorkerUnavailable), or the decode output poll ends with
  WorkerLost;
- its decode worker stalls: with requests waiting on it, it leaves its output poll unanswered for
  `stall_timeout_s` (a frozen process). The engine declares it lost (unhealthy until it answers a
  load again) and fails its attempts over: streaming ones through their chunk queues, prefilling
  ones through their fence;
- its KV transfer fails (corrupt, truncated or stalled frames, a receiver that refused or died): the
  prefill ran, the KV never arrived. The next pair avoids that decode worker when another can take it;
  the worker stays routable.
Its prompt plus every token already streamed is prefilled again on the new pair, with the random draws
those tokens took skipped, so the stream goes on at the next index with the token the uninterrupted
run would have produced (decode/worker.py `generated`). Re-prefilling rather than re-sending KV: a dead
or frozen decode worker's KV cannot be read, and a prefill worker keeps none after its transfer. Each
attempt has its own id on the workers (`_Run.key`: `id~N`, N numbering this engine's attempts): whatever
a stale attempt sends later (a frozen worker resumed) matches nothing and is dropped, and its abort, sent
when the attempt is given up, reaches it when it resumes. A worker remembers aborted ids and refuses them
for good (decode/worker.py), which is safe only because no id comes back: not a later attempt's, and not
a new request's that reuses an earlier one's request id. At most `max_migrations` placements after the
first; then UNAVAILABLE naming the workers tried. With no healthy worker to take it (a restarting
actor, two lost at once) a migration waits up to MIGRATE_WAIT_S for one. A re-prefill is due within
one TPOT target (its batcher deadline), since the client is already mid-stream.

A request the router places with `local` (conditional disaggregation) is prefilled by its decode
worker itself (DecodeWorker.prefill_local): no prefill worker, no transfer. Until it returns it is
counted in that worker's local queue (DecodeState.local_busy_s); the local prefills each worker
reports feed the "local_prefill" correction and the worker's stall meter (the ledger's).
"""
from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import structlog

from kvtransfer.sink import KVRefused
from hardware.perf import Deployment
from model.finish import Failure, FinishReason
from orchestrator.client.types import Prediction, Timings
from orchestrator.core.correction import TPOT_MIN_GAPS, ttft_key
from orchestrator.core.request import Request, RequestState
from orchestrator.core.router import Placement, Rejection, RouteRequest, Router
from orchestrator.serving.decode_outputs import DecodeOutputs, WorkerLost
from orchestrator.serving.ledger import WorkerLedger
from orchestrator.serving.workers import Pools, WorkerUnavailable
from prefill.worker import PrefillJob, PrefillResult

log = structlog.get_logger("engine")

VIEW_REFRESH_S = 0.05
ABORT_WAIT_S = 1.0  # the longest an abort waits for its workers' answers
MIGRATE_WAIT_S = 3.0  # the longest a migration waits for a healthy worker to place the request on


@dataclass(frozen=True, slots=True)
class TokenEvent:
    token_ids: list[int]
    text: str
    index: int = 0  # of token_ids[0] in the request's output (continuous across migrations)


@dataclass(frozen=True, slots=True)
class FinalEvent:
    finish_reason: FinishReason  # STOP, LENGTH or ABORT
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    prefill_worker: str
    decode_worker: str
    prediction: Prediction | None = None  # the router's, for the pair that served it
    migrations: int = 0  # times it was placed again because a worker died under it


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    failure: Failure
    rejection: str = ""  # Rejection.kind when the router turned the request away, else ""


Event = TokenEvent | FinalEvent | ErrorEvent


class KVTransferFailed(Exception):
    """An attempt's KV never reached its decode worker (corrupt, truncated or stalled transfer, a
    receiver that refused or died): the prefill ran, the pair is retried without that worker."""

    def __init__(self, worker_id: str, cause: str):
        super().__init__(f"KV transfer to {worker_id} failed ({cause})")
        self.worker_id, self.cause = worker_id, cause


def request_id_of(key: str) -> str:
    """The request id in an attempt's id on the workers (`_Run.key`)."""
    return key.rpartition("~")[0]


@dataclass(slots=True)
class _Run:
    """One placed request in flight, and what the engine still counts against its workers."""

    req: Request
    placed: Placement
    prefill_pending: bool = True  # in its prefill worker's queue (the ledger's) until the prefill returns
    decode_pending: bool = True  # counted on its decode worker (the ledger's) until the decode worker has it
    result: PrefillResult | None = None
    tokens: list[int] = field(default_factory=list)  # every token id streamed to the client, all attempts
    t_first: float | None = None  # monotonic time of its first chunk from the decode worker
    chunks: asyncio.Queue | None = None  # a local prefill's chunk queue (subscribed before the prefill)
    migrations: int = 0  # placements after the first (a worker died under it)
    lost: list[str] = field(default_factory=list)  # the workers that died under it, in order
    fence: asyncio.Future | None = None  # -> WorkerUnavailable: its attempt's decode worker was declared lost
    attempt: int = 0  # this engine's number for its current attempt (each placement gets a new one)
    stepping_s: float = 0.0  # its decode worker's TokenChunk.stepping_s, from the last chunk

    @property
    def key(self) -> str:
        """Its current attempt's id on the workers, `request_id~attempt`: a stale attempt's chunks, KV or
        abort never reach a later one (the fence), nor a later request that reuses the request id."""
        return f"{self.req.request_id}~{self.attempt}"

    @property
    def n_out(self) -> int:
        return len(self.tokens)

    @property
    def context_ids(self) -> list[int]:
        """What this attempt prefills: the prompt and every token already streamed."""
        return self.req.prompt_ids + self.tokens

    @property
    def context_tokens(self) -> int:
        return self.req.prompt_tokens + len(self.tokens)


class Engine:
    def __init__(self, pools: Pools, router: Router, perf: Deployment, decode_max_batch: int,
                 prefill_token_budget: int = 4096, prefill_max_batch: int = 8, kv_deadline_s: float = 30.0,
                 max_migrations: int = 3, stall_timeout_s: float = 2.0, local_chunk_tokens: int = 0):
        """`perf`: the live model on the cpu profile (orchestrator/serving/perfmodel.py); the batch
        settings are the workers' (cluster.yaml pools.*); `max_migrations`: placements a request may
        get after its first when workers die under it; `stall_timeout_s`: how long a decode worker with
        work may leave its output poll unanswered before it is declared lost (module docstring);
        `local_chunk_tokens`: the decode workers' (DecodeWorker: a local prefill rides the steps, that many
        tokens a step)."""
        self.pools = pools
        self.router = router
        self.kv_deadline_s = kv_deadline_s
        self.max_migrations = max_migrations
        self.stall_timeout_s = stall_timeout_s
        self.workers = WorkerLedger(pools, router.predictor.corrections, perf, decode_max_batch,
                                    prefill_token_budget, prefill_max_batch, local_chunk_tokens)
        self._live: dict[str, _Run] = {}  # request id -> its run, while it is placed
        self._aborted: set[str] = set()  # live requests an Abort RPC ended
        self._refreshers: list[asyncio.Task] = []  # one load refresh per worker, and the stall watch
        owner = f"engine-{uuid.uuid4().hex[:12]}"  # this engine's requests on the decode workers
        self._outputs = {w: DecodeOutputs(handle, owner) for w, handle in pools.decode.items()}
        self._owner = owner
        self._attempts = itertools.count(1)  # _Run.attempt

    async def start(self) -> None:
        await self.workers.refresh_all()
        loop = asyncio.get_running_loop()
        self._refreshers = [loop.create_task(self._refresh_forever(w, h))
                            for w, h in {**self.pools.prefill, **self.pools.decode}.items()]
        self._refreshers.append(loop.create_task(self._watch_stalls()))

    async def stop(self) -> None:
        for task in self._refreshers:
            task.cancel()
        await asyncio.gather(*self._refreshers, return_exceptions=True)  # ended, not left pending at exit
        await asyncio.gather(*(outputs.stop() for outputs in self._outputs.values()))

    # -- watching the workers ------------------------------------------------------------

    async def _refresh_forever(self, worker: str, handle) -> None:
        """One worker's load, every VIEW_REFRESH_S after its last answer: a frozen worker delays only
        its own view, never the others' (one gather across workers did)."""
        while True:
            await asyncio.sleep(VIEW_REFRESH_S)
            try:
                await self.workers.refresh(worker, handle)
            except Exception:  # a bug here must not stop the refresh
                log.warning("load refresh failed", worker=worker, exc_info=True)

    async def _watch_stalls(self) -> None:
        while True:
            await asyncio.sleep(VIEW_REFRESH_S)
            try:
                self._check_stalls(time.monotonic())
            except Exception:  # a bug here must not stop the watch
                log.warning("stall check failed", exc_info=True)

    def _check_stalls(self, now: float) -> None:
        """Declare lost a decode worker that has requests waiting on it and has left its output poll
        unanswered for longer than stall_timeout_s (a frozen process; a live one answers every 0.5 s).
        Step progress from the load reports is not a signal: they come in one gather across workers,
        late whenever any worker is slow to answer, and a live worker busy with local prefills or
        starved of CPU takes no step for a while (both gave false alarms under chaos)."""
        for w, outputs in self._outputs.items():
            quiet = outputs.quiet_s(now)
            if quiet > self.stall_timeout_s:
                self._declare_lost(w, f"stalled: no answer for {quiet:.1f} s")

    def _declare_lost(self, worker: str, cause: str) -> None:
        """Every attempt on this decode worker migrates: streaming ones through their chunk queues,
        prefilling ones through their fence. Whatever the worker sends for them later is dropped."""
        lost = WorkerUnavailable(worker, cause)
        self.workers.mark_unhealthy(worker, lost)
        streaming = self._outputs[worker].lose(cause)
        prefilling = 0
        for run in self._live.values():
            if run.placed.decode_worker == worker and run.fence is not None and not run.fence.done():
                run.fence.set_result(lost)
                prefilling += 1
        if streaming or prefilling:
            log.warning("decode worker declared lost: its requests migrate", worker=worker, cause=cause,
                        streaming=streaming, prefilling=prefilling)

    def placements(self) -> dict[str, tuple[str, str]]:
        """Each live request's current pair: request id -> (prefill worker, "" for a local prefill; decode worker)."""
        return {rid: ("" if r.placed.local else r.placed.prefill_worker, r.placed.decode_worker)
                for rid, r in self._live.items()}

    def queue_depths(self) -> dict[str, int]:
        """Live requests, prompts this engine has queued at prefill workers, and sequences the decode
        workers last reported waiting: what must stay bounded under overload."""
        return {"live": len(self._live), "prefill_queued": self.workers.queued_prompts(),
                "decode_waiting": sum(l.waiting for l in self.workers.decode_loads.values())}

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
            while True:  # one attempt per placement: a worker that dies under it starts the next
                try:
                    started = await self._start_attempt(run)
                    if not isinstance(started, asyncio.Queue):
                        yield started
                        return
                    while True:  # the decode stream: the first token, then one chunk per poll with news
                        chunk = await started.get()
                        if isinstance(chunk, WorkerLost):
                            raise WorkerUnavailable(chunk.worker_id, chunk.cause)
                        if run.t_first is None:
                            run.t_first = time.monotonic()
                            self._observe_ttft(run)
                        if chunk.token_ids:
                            assert chunk.start_index == run.n_out, (chunk.start_index, run.n_out)
                            run.tokens += chunk.token_ids
                            yield TokenEvent(list(chunk.token_ids), "".join(chunk.texts), chunk.start_index)
                        if chunk.finished:
                            run.stepping_s = chunk.stepping_s
                            break
                    yield self._fail(req, chunk.error) if chunk.error else self._final(run, chunk.finish_reason)
                    return
                except (WorkerUnavailable, KVTransferFailed) as e:  # a worker died, or the KV was lost: again
                    ended = await self._migrate(run, e)
                    if ended is not None:
                        yield ended
                        return
        except (asyncio.CancelledError, GeneratorExit):
            if not req.state.terminal:  # the client went away before the end
                self._ended(req, FinishReason.ABORT, by="client")
                await self._abort_everywhere(run.key, run.placed)
            raise
        finally:
            self._release(run)

    async def _start_attempt(self, run: _Run) -> asyncio.Queue | FinalEvent | ErrorEvent:
        """Prefill and hand over the current placement's attempt: its chunk queue, or how it ended.
        Raises WorkerUnavailable when a worker of the pair dies, or its decode worker is declared lost
        (the fence) before the hand-over is done."""
        work = asyncio.ensure_future(self._hand_over(run))
        try:
            await asyncio.wait((work, run.fence), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():  # the fence fell (or the client left): stop waiting for this attempt
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        if work.cancelled():
            raise run.fence.result()
        return work.result()

    async def _hand_over(self, run: _Run) -> asyncio.Queue | FinalEvent | ErrorEvent:
        req, placed = run.req, run.placed
        res = await (self._prefill_here(run) if placed.local else self._prefill(run))
        if req.request_id in self._aborted:  # the Abort RPC stopped the prefill, or came while it ran
            if res.ok:  # the decode side may have taken the KV after the abort reached it: release it
                await self.pools.decode[placed.decode_worker].abort(run.key)
            return self._final(run, FinishReason.ABORT)
        if not res.ok and res.kv_failed:
            raise KVTransferFailed(placed.decode_worker, f"{res.error.code}: {res.error.message}")
        if not res.ok:
            return self._fail(req, Failure(res.error.code, f"prefill failed: {res.error.message}"))
        return run.chunks if placed.local else await self._submit(run)

    async def _migrate(self, run: _Run,
                       lost: WorkerUnavailable | KVTransferFailed) -> FinalEvent | ErrorEvent | None:
        """A worker died under `run`, or its KV transfer failed: place it again (None), or how it ends
        (the limit, no worker left). After a failed transfer the next pair avoids that decode worker
        when another can take the request; the worker itself stays routable."""
        req = run.req
        if isinstance(lost, WorkerUnavailable):
            self.workers.mark_unhealthy(lost.worker_id, lost)
        await self._abort_everywhere(run.key, run.placed)  # the survivor of the pair holds nothing of it
        self._forget_placement(run)
        run.lost.append(lost.worker_id if isinstance(lost, WorkerUnavailable) else f"{lost.worker_id} (kv transfer)")
        if run.n_out >= req.sampling.max_tokens:  # every token is out; only the last chunk's end was lost
            return self._final(run, FinishReason.LENGTH)
        tried = ", ".join(run.lost)
        if run.migrations >= self.max_migrations:
            return self._fail(req, Failure("UNAVAILABLE", f"{lost}; gave up after {run.migrations} migrations "
                                                          f"(workers lost: {tried})"))
        give_up = time.monotonic() + MIGRATE_WAIT_S
        while True:  # no healthy worker now (a restarting actor, a worker lost at the same moment): wait a little
            now = time.monotonic()
            pf_views, dc_views = self.workers.views(now)
            if isinstance(lost, KVTransferFailed) and any(v.healthy and v.worker_id != lost.worker_id
                                                          for v in dc_views):
                dc_views = [v for v in dc_views if v.worker_id != lost.worker_id]
            placed = self.router.place(RouteRequest(req.request_id, run.context_tokens,
                                                    req.sampling.max_tokens - run.n_out, req.sla),
                                       pf_views, dc_views, now, reject=False)
            if not (isinstance(placed, Rejection) and placed.code == "UNAVAILABLE") or now >= give_up:
                break
            await asyncio.sleep(VIEW_REFRESH_S * 4)
        if isinstance(placed, Rejection):
            return self._fail(req, Failure("UNAVAILABLE", f"{lost}; no worker to migrate to ({placed.reason})"))
        run.migrations += 1
        log.info("request migrated", request_id=req.request_id, lost=lost.worker_id, cause=lost.cause,
                 tokens=run.n_out, prefill_worker=placed.prefill_worker, decode_worker=placed.decode_worker,
                 migrations=run.migrations)
        self._place(run, placed)
        return None

    def _route(self, req: Request) -> Placement | Rejection:
        now = time.monotonic()
        pf_views, dc_views = self.workers.views(now)
        return self.router.place(RouteRequest(req.request_id, req.prompt_tokens, req.sampling.max_tokens, req.sla),
                                 pf_views, dc_views, now)

    def _admit(self, req: Request, placed: Placement) -> _Run:
        run = _Run(req, placed)
        self._place(run, placed)
        return run

    def _place(self, run: _Run, placed: Placement) -> None:
        """Count `run`'s attempt on `placed` against its workers until they report it."""
        req = run.req
        run.placed, run.result, run.chunks = placed, None, None
        run.attempt = next(self._attempts)
        run.fence = asyncio.get_running_loop().create_future()
        run.prefill_pending, run.decode_pending = not placed.local, True
        self._live[req.request_id] = run
        self.workers.count(run.key, placed, run.context_tokens, req.sampling.max_tokens - run.n_out, req.sla,
                           req.arrival_s, mid_stream=run.n_out > 0)

    async def _prefill(self, run: _Run) -> PrefillResult:
        """Prefill and KV transfer: resolves once the KV is committed on the decode worker, or failed."""
        req, placed = run.req, run.placed
        req.advance(RequestState.PREFILLING)
        deadline_ms = req.sla.tpot_ms if run.n_out else req.sla.ttft_ms  # as _place queued it
        run.result = res = await self.pools.prefill[placed.prefill_worker].prefill(PrefillJob(
            run.key, run.context_ids, req.sampling, self.pools.kv_targets[placed.decode_worker],
            self.kv_deadline_s, req.sla.priority, deadline_ms / 1e3, run.n_out))
        self.workers.prefilled(run.key, placed, committed=res.ok)
        run.prefill_pending = False
        if res.ok and res.batch_lengths:
            self.workers.observe_prefill(placed.prefill_worker, run.context_tokens, res)
        return res

    async def _prefill_here(self, run: _Run) -> PrefillResult:
        """Local prefill on the decode worker: resolves once the request is in its batch (its chunks then
        come to `run.chunks`), or failed; the same result as a prefill worker's, with no transfer."""
        req, w = run.req, run.placed.decode_worker
        req.advance(RequestState.PREFILLING)
        run.chunks = self._outputs[w].subscribe(run.key)
        try:
            got = await self.pools.decode[w].prefill_local(run.key, run.context_ids, req.sampling, self._owner,
                                                           req.sla.priority, run.tokens)
        except KVRefused as e:  # no room after all (a race with a handoff), or an id already live there
            run.result = PrefillResult(run.key, error=Failure(e.code, str(e)))
            return run.result
        finally:
            self.workers.local_done(run.key, w)
        error = None
        if got.ran:
            self._decode_seen(run)
            req.advance(RequestState.TRANSFERRING)  # nothing to transfer: its KV is in the pool already
            req.advance(RequestState.DECODING)
        elif req.request_id not in self._aborted:
            error = Failure("INTERNAL", "the decode worker's local prefill failed")
        run.result = PrefillResult(run.key, got.first_token, got.queued_ms, got.prefill_ms, error=error)
        return run.result

    def _observe_ttft(self, run: _Run) -> None:
        """The request's whole TTFT against the parts' prediction (the "ttft" correction)."""
        req, placed = run.req, run.placed
        self.router.predictor.corrections.observe(ttft_key(placed.prefill_worker, req.sla.ttft_ms / 1e3), "ttft",
                                                  run.t_first - req.arrival_s, placed.ttft_model_ms / 1e3)

    async def _submit(self, run: _Run) -> asyncio.Queue:
        """Hand the first token to the decode worker holding the KV; returns the request's chunk queue."""
        req, placed = run.req, run.placed
        req.advance(RequestState.TRANSFERRING)
        chunks = self._outputs[placed.decode_worker].subscribe(run.key)
        await self.pools.decode[placed.decode_worker].submit(run.key, run.result.first_token, req.sampling,
                                                             run.context_ids, self._owner, req.sla.priority,
                                                             run.tokens)
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
        if (reason in (FinishReason.STOP, FinishReason.LENGTH) and run.n_out > TPOT_MIN_GAPS and run.stepping_s > 0
                and not run.migrations):  # its steps against their forecast, and what lies outside them (Corrections)
            self.router.predictor.corrections.observe_decode(
                p.decode_worker, timings.mean_tpot_ms / 1e3, run.stepping_s, run.n_out - 1, p.tpot_wait_ms / 1e3,
                p.step_model_ms / 1e3, self.workers.seen_window(p.decode_worker, req.arrival_s))
        prediction = Prediction(p.predicted_ttft_ms, p.predicted_tpot_ms, p.ttft_bound_ms, p.tpot_bound_ms, q)
        return FinalEvent(reason, req.prompt_tokens, run.n_out, timings, p.prefill_worker, p.decode_worker, prediction,
                          run.migrations)

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
        self.workers.seen(run.key, run.placed.decode_worker, run.context_tokens)
        run.decode_pending = False

    def _forget_placement(self, run: _Run) -> None:
        """Stop counting the current attempt against its workers."""
        placed = run.placed
        if run.decode_pending:
            self._decode_seen(run)
        self.workers.forget(run.key, placed, run.prefill_pending)
        run.prefill_pending = False
        self._outputs[placed.decode_worker].unsubscribe(run.key)

    def _release(self, run: _Run) -> None:
        self._forget_placement(run)
        self._live.pop(run.req.request_id, None)
        self._aborted.discard(run.req.request_id)

    async def _abort_everywhere(self, key: str, placed: Placement) -> None:
        """Abort an attempt on its pair. Waits at most ABORT_WAIT_S: a stalled worker gets the call when
        it resumes (Ray delivers it then), and the attempt's key fences it off meanwhile."""
        workers = [self.pools.decode[placed.decode_worker]]
        if not placed.local:
            workers.append(self.pools.prefill[placed.prefill_worker])
        calls = asyncio.gather(*(w.abort(key) for w in workers), return_exceptions=True)
        try:
            async with asyncio.timeout(ABORT_WAIT_S):  # not wait_for: on 3.11 it can swallow a cancel
                await calls
        except TimeoutError:
            log.warning("abort not answered in time: the worker gets it when it resumes", attempt=key,
                        workers=[w.worker_id for w in workers])

    async def abort(self, request_id: str) -> bool:
        """The Abort RPC: stop a live request on both pools; its stream ends with FinishReason.ABORT."""
        run = self._live.get(request_id)
        if run is None:
            return False
        self._aborted.add(request_id)
        await self._abort_everywhere(run.key, run.placed)
        return True
