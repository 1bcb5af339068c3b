"""Drives one request through the pools: route, prefill + KV transfer, decode, stream tokens.

Transport-free: the gRPC frontend and tests consume the event stream `Engine.generate` yields.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import structlog
from ray.exceptions import RayError

from decode.worker import DecodeLoad
from model.generation import find_stop
from model.tokenizer import IncrementalDecoder, Tokenizer
from orchestrator.client.types import Timings
from orchestrator.serving.decode_outputs import DecodeOutputs
from orchestrator.serving.pools import Pools
from orchestrator.core.request import FinishReason, Request, RequestState
from orchestrator.core.router import DecodeView, Placement, PrefillView, Rejection, RouteRequest, Router
from prefill.worker import PrefillJob, PrefillLoad

log = structlog.get_logger("engine")

VIEW_REFRESH_S = 0.05
LOAD_TIMEOUT_S = 2.0  # a worker whose load() takes longer (hung, or restarting) counts as unhealthy


@dataclass(frozen=True, slots=True)
class TokenEvent:
    token_ids: list[int]
    text: str


@dataclass(frozen=True, slots=True)
class FinalEvent:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    prefill_worker: str
    decode_worker: str


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    code: str  # gRPC status name
    message: str


Event = TokenEvent | FinalEvent | ErrorEvent


class Engine:
    def __init__(self, pools: Pools, tokenizer: Tokenizer, router: Router, decode_max_batch: int,
                 kv_deadline_s: float = 30.0):
        self.pools = pools
        self.decode_max_batch = decode_max_batch
        self.tokenizer = tokenizer
        self.router = router
        self.kv_deadline_s = kv_deadline_s
        self.prefill_loads: dict[str, PrefillLoad] = {}  # worker id -> last reported load
        self.decode_loads: dict[str, DecodeLoad] = {}
        self._pending_prefill_tokens: dict[str, int] = {w: 0 for w in pools.prefill}
        self._pending_decode: dict[str, int] = {w: 0 for w in pools.decode}
        self._live: dict[str, Placement] = {}
        self._aborted: set[str] = set()  # live requests an Abort RPC ended: they must not be submitted
        self.unhealthy: set[str] = set()  # workers whose last call failed: reported, never routed to
        self._refresher: asyncio.Task | None = None
        owner = f"engine-{uuid.uuid4().hex[:12]}"  # this engine's requests on the decode workers
        self._outputs = {w: DecodeOutputs(actor, owner) for w, actor in pools.decode.items()}
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
        ask = lambda actor: asyncio.wait_for(actor.load.remote(), LOAD_TIMEOUT_S)  # noqa: E731
        pf, dc = await asyncio.gather(
            asyncio.gather(*(ask(a) for a in self.pools.prefill.values()), return_exceptions=True),
            asyncio.gather(*(ask(a) for a in self.pools.decode.values()), return_exceptions=True))
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
        """Yield token events, then one final or error event. Closing the iteration early aborts."""
        t0 = time.perf_counter()
        pf_views, dc_views = self.views()
        placed = self.router.place(RouteRequest(req.request_id, req.prompt_tokens, req.sampling.max_tokens, req.sla),
                                   pf_views, dc_views, time.monotonic())
        if isinstance(placed, Rejection):
            log.info("rejected", request_id=req.request_id, reason=placed.reason)
            yield ErrorEvent(placed.code, placed.reason)
            return
        self._live[req.request_id] = placed
        prefill = self.pools.prefill[placed.prefill_worker]
        decode = self.pools.decode[placed.decode_worker]
        self._pending_prefill_tokens[placed.prefill_worker] += req.prompt_tokens
        self._pending_decode[placed.decode_worker] += 1
        prefill_pending = decode_pending = True  # counted in _pending_* until the worker reports it
        n_out, reason, finished = 0, FinishReason.LENGTH, False
        calling = placed.prefill_worker  # the worker a Ray failure is blamed on
        try:
            req.advance(RequestState.PREFILLING, time.monotonic())
            res = await prefill.prefill.remote(PrefillJob(
                req.request_id, req.prompt_ids, req.sampling, self.pools.kv_targets[placed.decode_worker],
                self.kv_deadline_s, req.sla.priority))
            self._pending_prefill_tokens[placed.prefill_worker] -= req.prompt_tokens
            prefill_pending = False
            if not res.ok:
                if req.request_id in self._aborted:  # the Abort RPC stopped the prefill or its transfer
                    now_ms = (time.perf_counter() - t0) * 1e3
                    yield FinalEvent(FinishReason.ABORT, req.prompt_tokens, 0,
                                     Timings(queued_ms=res.queued_ms, prefill_ms=res.prefill_ms,
                                             transfer_ms=res.transfer_tail_ms, ttft_ms=now_ms, mean_tpot_ms=0.0,
                                             e2e_ms=now_ms),
                                     placed.prefill_worker, placed.decode_worker)
                else:
                    yield ErrorEvent(res.error_code or "INTERNAL", f"prefill failed: {res.error}")
                return
            req.advance(RequestState.TRANSFERRING, time.monotonic())  # committed on the decode side
            calling = placed.decode_worker
            t_first = time.perf_counter()
            first = res.first_token
            first_text = IncrementalDecoder(self.tokenizer).push(first)  # the decode worker's texts[0]
            cut = find_stop(first_text, req.sampling.stop) if req.sampling.stop else -1
            if first in req.sampling.stop_token_ids(self.tokenizer.stop_token_ids):
                reason, finished = FinishReason.STOP, True
            else:
                n_out = 1
                yield TokenEvent([first], first_text if cut < 0 else first_text[:cut])
                if cut >= 0 or req.sampling.max_tokens == 1:
                    reason, finished = (FinishReason.STOP if cut >= 0 else FinishReason.LENGTH), True
            if req.request_id in self._aborted:  # aborted while its first token was out: the decode
                reason, finished = FinishReason.ABORT, True  # side has released its KV, never submit it
            elif finished:
                await decode.abort.remote(req.request_id)  # release the KV that was transferred
            else:
                chunks = self._outputs[placed.decode_worker].subscribe(req.request_id)
                await decode.submit.remote(req.request_id, first, req.sampling, req.prompt_ids, self._owner)
                self._pending_decode[placed.decode_worker] -= 1
                decode_pending = False
                req.advance(RequestState.DECODING, time.monotonic())
            while not finished:
                chunk = await chunks.get()
                skip = 1 if chunk.start_index == 0 else 0  # the first token was already sent
                ids, texts = list(chunk.token_ids[skip:]), chunk.texts[skip:]
                if ids:
                    n_out += len(ids)
                    yield TokenEvent(ids, "".join(texts))
                if chunk.finished:
                    if chunk.finish_reason == "error":
                        code, _, message = (chunk.error or "INTERNAL: decode failed").partition(": ")
                        yield ErrorEvent(code, message)
                        return
                    reason, finished = FinishReason(chunk.finish_reason), True
            t_end = time.perf_counter()
            req.advance(RequestState.FINISHED, time.monotonic())
            timings = Timings(
                queued_ms=res.queued_ms, prefill_ms=res.prefill_ms, transfer_ms=res.transfer_tail_ms,
                ttft_ms=(t_first - t0) * 1e3, e2e_ms=(t_end - t0) * 1e3,
                mean_tpot_ms=((t_end - t_first) * 1e3 / (n_out - 1)) if n_out > 1 else 0.0)
            log.info("finished", request_id=req.request_id, reason=reason.value, tokens=n_out,
                     ttft_ms=round(timings.ttft_ms, 1), e2e_ms=round(timings.e2e_ms, 1))
            yield FinalEvent(reason, req.prompt_tokens, n_out, timings, placed.prefill_worker, placed.decode_worker)
        except (asyncio.CancelledError, GeneratorExit):
            log.info("aborted by client", request_id=req.request_id)
            await self._abort_everywhere(req.request_id, placed)
            raise
        except RayError as e:  # the worker's actor died or is unreachable: fail this request, keep serving
            self._mark_unhealthy(calling, e)
            log.warning("worker failed", request_id=req.request_id, worker=calling, error=type(e).__name__)
            await self._abort_everywhere(req.request_id, placed)
            yield ErrorEvent("UNAVAILABLE", f"worker {calling} is unavailable ({type(e).__name__})")
        finally:
            if prefill_pending:
                self._pending_prefill_tokens[placed.prefill_worker] -= req.prompt_tokens
            if decode_pending:
                self._pending_decode[placed.decode_worker] -= 1
            self._outputs[placed.decode_worker].unsubscribe(req.request_id)
            self._live.pop(req.request_id, None)
            self._aborted.discard(req.request_id)

    async def _abort_everywhere(self, request_id: str, placed: Placement) -> None:
        await asyncio.gather(self.pools.prefill[placed.prefill_worker].abort.remote(request_id),
                             self.pools.decode[placed.decode_worker].abort.remote(request_id),
                             return_exceptions=True)

    async def abort(self, request_id: str) -> bool:
        placed = self._live.get(request_id)
        if placed is None:
            return False
        self._aborted.add(request_id)
        await self._abort_everywhere(request_id, placed)
        return True
