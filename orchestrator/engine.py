"""Drives one request through the pools: route, prefill + KV transfer, decode, stream tokens.

Transport-free: the gRPC frontend and tests consume the event stream `Engine.generate` yields.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator

import structlog

from model.generation import find_stop
from model.tokenizer import IncrementalDecoder, Tokenizer
from orchestrator.pools import Pools
from orchestrator.request import FinishReason, Request, RequestState, Timings
from orchestrator.router import DecodeView, Placement, PrefillView, Rejection, RouteRequest, Router
from prefill.worker import PrefillJob

log = structlog.get_logger("engine")

VIEW_REFRESH_S = 0.05


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
    def __init__(self, pools: Pools, tokenizer: Tokenizer, router: Router, kv_deadline_s: float = 30.0):
        self.pools = pools
        self.tokenizer = tokenizer
        self.router = router
        self.kv_deadline_s = kv_deadline_s
        self._prefill_views: dict[str, PrefillView] = {}
        self._decode_views: dict[str, DecodeView] = {}
        self._pending_prefill_tokens: dict[str, int] = {w: 0 for w in pools.prefill}
        self._pending_decode: dict[str, int] = {w: 0 for w in pools.decode}
        self._live: dict[str, Placement] = {}
        self._refresher: asyncio.Task | None = None

    async def start(self) -> None:
        await self._refresh_views()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._refresher:
            self._refresher.cancel()

    # -- views for the router ------------------------------------------------------------

    async def _refresh_views(self) -> None:
        pf = await asyncio.gather(*(a.load.remote() for a in self.pools.prefill.values()))
        dc = await asyncio.gather(*(a.load.remote() for a in self.pools.decode.values()))
        self._prefill_views = {l.worker_id: PrefillView(l.worker_id, l.queued_tokens, l.tokens_per_s) for l in pf}
        self._decode_views = {
            l.worker_id: DecodeView(l.worker_id, l.active + l.waiting, l.max_batch, l.free_kv_tokens,
                                    l.total_kv_tokens, l.predicted_step_ms) for l in dc}

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(VIEW_REFRESH_S)
            try:
                await self._refresh_views()
            except Exception:  # a dead worker shows up as errors on its requests, not here
                log.warning("load refresh failed", exc_info=True)

    def _views(self):
        """Worker views plus what this engine has sent them since the last refresh."""
        pf = [PrefillView(v.worker_id, v.queued_tokens + self._pending_prefill_tokens[v.worker_id], v.tokens_per_s)
              for v in self._prefill_views.values()]
        dc = [DecodeView(v.worker_id, v.active + self._pending_decode[v.worker_id], v.max_batch, v.free_kv_tokens,
                         v.total_kv_tokens, v.step_ms) for v in self._decode_views.values()]
        return pf, dc

    def server_load(self) -> tuple[list[PrefillView], list[DecodeView]]:
        return self._views()

    # -- one request ---------------------------------------------------------------------

    async def generate(self, req: Request) -> AsyncIterator[Event]:
        """Yield token events, then one final or error event. Cancelling the iteration aborts."""
        t0 = time.perf_counter()
        pf_views, dc_views = self._views()
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
        decoder = IncrementalDecoder(self.tokenizer)
        text, n_out, reason = "", 0, FinishReason.LENGTH
        decode_started = False
        prefill_pending = decode_pending = True  # counted in _pending_* until the worker reports it
        try:
            req.advance(RequestState.PREFILLING, time.monotonic())
            kv_target = self.pools.kv_targets[placed.decode_worker]
            res = await prefill.prefill.remote(PrefillJob(
                req.request_id, req.prompt_ids, req.sampling, kv_target, self.kv_deadline_s, req.sla.priority))
            self._pending_prefill_tokens[placed.prefill_worker] -= req.prompt_tokens
            prefill_pending = False
            if not res.ok:
                yield ErrorEvent(res.error_code or "INTERNAL", f"prefill failed: {res.error}")
                return
            t_first = time.perf_counter()
            first = res.first_token
            tokens = [first]
            if first in self.tokenizer.stop_token_ids or req.sampling.max_tokens == 1:
                reason = FinishReason.STOP if first in self.tokenizer.stop_token_ids else FinishReason.LENGTH
                await decode.abort.remote(req.request_id)  # release the transferred KV
                tokens = [] if reason is FinishReason.STOP else tokens
            else:
                req.advance(RequestState.TRANSFERRING, time.monotonic())
                await decode.submit.remote(req.request_id, first, req.sampling)
                self._pending_decode[placed.decode_worker] -= 1
                decode_pending, decode_started = False, True
                req.advance(RequestState.DECODING, time.monotonic())
            done = not decode_started
            while True:
                stopped = False
                if tokens:
                    if tokens[-1] in self.tokenizer.stop_token_ids:
                        tokens, reason, stopped = tokens[:-1], FinishReason.STOP, True
                    deltas = "".join(decoder.push(t) for t in tokens)
                    cut = find_stop(text + deltas, req.sampling.stop) if req.sampling.stop else -1
                    if cut >= 0:
                        deltas, reason, stopped = (text + deltas)[len(text):cut], FinishReason.STOP, True
                    n_out += len(tokens)
                    text += deltas
                    yield TokenEvent(tokens, deltas)
                if done or stopped:
                    break
                batch = await decode.next_tokens.remote(req.request_id)
                tokens, done = list(batch.tokens), batch.finished
                if done and batch.finish_reason:
                    reason = FinishReason(batch.finish_reason)
            if decode_started and reason is FinishReason.STOP:
                await decode.abort.remote(req.request_id)  # stopped by a stop string before the worker knew
            t_end = time.perf_counter()
            req.advance(RequestState.FINISHED, time.monotonic())
            ttft_ms = (t_first - t0) * 1e3
            timings = Timings(
                queued_ms=res.queued_ms, prefill_ms=res.prefill_ms, transfer_ms=res.transfer_tail_ms, ttft_ms=ttft_ms,
                mean_tpot_ms=((t_end - t_first) * 1e3 / (n_out - 1)) if n_out > 1 else 0.0, e2e_ms=(t_end - t0) * 1e3)
            log.info("finished", request_id=req.request_id, reason=reason.value, tokens=n_out,
                     ttft_ms=round(ttft_ms, 1), e2e_ms=round(timings.e2e_ms, 1))
            yield FinalEvent(reason, req.prompt_tokens, n_out, timings, placed.prefill_worker, placed.decode_worker)
        except (asyncio.CancelledError, GeneratorExit):
            log.info("aborted by client", request_id=req.request_id)
            await self._abort_everywhere(req.request_id, placed)
            raise
        finally:
            if prefill_pending:
                self._pending_prefill_tokens[placed.prefill_worker] -= req.prompt_tokens
            if decode_pending:
                self._pending_decode[placed.decode_worker] -= 1
            self._live.pop(req.request_id, None)

    async def _abort_everywhere(self, request_id: str, placed: Placement) -> None:
        await asyncio.gather(self.pools.prefill[placed.prefill_worker].abort.remote(request_id),
                             self.pools.decode[placed.decode_worker].abort.remote(request_id),
                             return_exceptions=True)

    async def abort(self, request_id: str) -> bool:
        placed = self._live.get(request_id)
        if placed is None:
            return False
        await self._abort_everywhere(request_id, placed)
        return True
