"""The Engine in one process, no Ray: a real PrefillWorker and DecodeWorker over the in-process KV
backend, behind the same worker handles Ray actors get. Greedy output against model/generation.py,
stop strings, an abort at each stage (the decode pool's KV freed after each), a worker failure."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager

import pytest

from decode.worker import DecodeWorker
from kvtransfer.inprocess import InProcessBackend
from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import SenderConfig
from model.finish import Failure, FinishReason
from model.generation import generate
from model.sampling import SamplingParams
from model.tokenizer import ChatMessage
from orchestrator.core.arrivals import DecodeArrivals
from orchestrator.core.correction import TPOT_MIN_GAPS
from orchestrator.core.request import Request, RequestState, SLATarget
from orchestrator.core.router import Router
from orchestrator.serving.perfmodel import live_deployment
from orchestrator.serving.engine import Engine, ErrorEvent, FinalEvent, TokenEvent, request_id_of
from orchestrator.serving.workers import DecodeHandle, LocalCalls, Pools, PrefillHandle, WorkerUnavailable
from prefill.worker import PrefillWorker
from tests.paths import REPO

ANY_SLA = SLATarget(ttft_ms=1e9, tpot_ms=1e9)


@pytest.fixture(scope="module")
def prompt(lm):
    return lm.tokenizer.chat_ids([ChatMessage("user", "What is the capital of France? Answer in one sentence.")])


class _GatedSink:
    """The decode pool as the KV receiver sees it; a gated request's transfer (any attempt of it) waits
    at its second layer."""

    def __init__(self, pool):
        self.pool = pool
        self.gates: dict[str, threading.Event] = {}
        self.reached: dict[str, threading.Event] = {}

    def gate(self, request_id: str) -> None:
        self.gates[request_id], self.reached[request_id] = threading.Event(), threading.Event()

    def write(self, key, layer, token_start, k, v):
        request_id = request_id_of(key)
        if request_id in self.gates and layer == 1:
            self.reached[request_id].set()
            self.gates[request_id].wait(60)
        self.pool.write(key, layer, token_start, k, v)

    def __getattr__(self, name):  # open, commit, abort: straight to the pool
        return getattr(self.pool, name)


class _Setup:
    def __init__(self, lm, decode_calls: type[LocalCalls] = LocalCalls, n_decode: int = 1, **engine_kw):
        self.decodes = [DecodeWorker(capacity_tokens=2048, block_size=16, max_batch=8, blas_threads=1, loaded=lm)
                        for _ in range(n_decode)]
        self.decode = self.decodes[0]
        self.sink = _GatedSink(self.decode.kv_sink)
        receivers = {f"decode-{i}": KVReceiver(self.sink if i == 0 else d.kv_sink, expected_layout=d.layout)
                     for i, d in enumerate(self.decodes)}
        self.prefill = PrefillWorker("prefill-0", blas_threads=1, transfer_backend=InProcessBackend(receivers),
                                     loaded=lm)
        self.prefill_calls, self.decode_calls = LocalCalls(self.prefill), decode_calls(self.decode)
        calls = [self.decode_calls] + [LocalCalls(d) for d in self.decodes[1:]]
        pools = Pools(prefill={"prefill-0": PrefillHandle("prefill-0", self.prefill_calls)},
                      decode={f"decode-{i}": DecodeHandle(f"decode-{i}", c) for i, c in enumerate(calls)},
                      kv_targets={w: w for w in receivers})
        self.engine = Engine(pools, Router("least_loaded"), live_deployment("smollm2-135m")[0], decode_max_batch=8,
                             **engine_kw)

    async def kv_freed(self, worker: DecodeWorker | None = None) -> bool:
        """True once every KV block of the decode pool (decode-0's by default) is free again (False after 30 s)."""
        worker = worker or self.decode
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            load = await worker.load()
            if load.free_blocks == load.total_blocks and load.active + load.waiting == 0:
                return True
            await asyncio.sleep(0.01)
        return False


@asynccontextmanager
async def running(lm, **kw):
    s = _Setup(lm, **kw)
    for d in s.decodes:
        await d.start()
    await s.engine.start()
    try:
        yield s
    finally:
        await s.engine.stop()
        for d in s.decodes:
            await d.close()


def request(rid: str, prompt_ids: list[int], **params) -> Request:
    return Request(rid, list(prompt_ids), SamplingParams(**params), ANY_SLA, time.monotonic())


async def collect(events) -> list:
    return [ev async for ev in events]


def text_of(events) -> str:
    return "".join(ev.text for ev in events if isinstance(ev, TokenEvent))


def ids_of(events) -> list[int]:
    return [t for ev in events if isinstance(ev, TokenEvent) for t in ev.token_ids]


def reference(lm, prompt_ids, **params) -> tuple[list[int], str]:
    out = list(generate(lm.model, lm.tokenizer, prompt_ids, SamplingParams(**params)))
    return [t.token_id for t in out], "".join(t.text for t in out)


def test_greedy_request_streams_the_reference_text(lm, prompt):
    ref_ids, ref_text = reference(lm, prompt, max_tokens=24)

    async def main():
        async with running(lm) as s:
            req = request("g", prompt, max_tokens=24)
            events = await collect(s.engine.generate(req))
            assert await s.kv_freed()
            return req, events, s

    req, events, s = asyncio.run(main())
    final = events[-1]
    assert ids_of(events) == ref_ids and text_of(events) == ref_text and "Paris" in ref_text
    assert isinstance(final, FinalEvent) and final.completion_tokens == len(ref_ids)
    assert final.finish_reason is (FinishReason.STOP if len(ref_ids) < 24 else FinishReason.LENGTH)
    assert (req.state, req.finish_reason) == (RequestState.FINISHED, final.finish_reason)
    assert final.timings.ttft_ms <= final.timings.e2e_ms
    assert s.decode_calls.calls["abort"] == 0 and s.prefill_calls.calls["abort"] == 0


def test_the_engine_records_the_share_of_a_core_each_workers_compute_got(lm, prompt):
    async def main():
        async with running(lm) as s:
            await collect(s.engine.generate(request("c", prompt, max_tokens=8)))
            for _ in range(200):  # the decode steps arrive with the worker's next load (every 50 ms; bounded)
                if all(s.engine.workers.cpu_shares.values()):
                    break
                await asyncio.sleep(0.01)
            return {w: list(v) for w, v in s.engine.workers.cpu_shares.items()}

    shares = asyncio.run(main())
    assert shares and all(v and all(0 < x <= 1 for x in v) for v in shares.values())


def _split_stop(lm, prompt) -> tuple[str, str, int]:
    """A stop string made of the end of one token's text and the start of the next one's; the text
    before it, and how many tokens it takes to complete it."""
    out = list(generate(lm.model, lm.tokenizer, prompt, SamplingParams(max_tokens=24)))
    full = "".join(t.text for t in out)
    at = 0  # where token i + 1's text starts
    for i in range(len(out) - 1):
        at += len(out[i].text)
        stop = out[i].text[-2:] + out[i + 1].text[:2]
        if len(out[i].text) >= 2 and len(out[i + 1].text) >= 2 and full.find(stop) == at - 2:
            return stop, full[:at - 2], i + 2
    raise AssertionError(f"no two tokens of {full!r} to split a stop string across")


@pytest.mark.parametrize("case", ["split across two tokens", "inside the first token", "first token, max_tokens=1"])
def test_stop_strings(lm, prompt, case):
    ref_ids, _ = reference(lm, prompt, max_tokens=24)
    first_text = lm.tokenizer.decode(ref_ids[:1])
    assert len(first_text.strip()) >= 2, first_text
    if case == "split across two tokens":
        stop, expected, n_tokens = _split_stop(lm, prompt)
        max_tokens = 24
    else:
        stop, expected, n_tokens = first_text[-1], first_text[:-1], 1  # cut inside the first token's text
        assert first_text.find(stop) == len(first_text) - 1, first_text
        max_tokens = 1 if "max_tokens=1" in case else 24
    params = dict(max_tokens=max_tokens, stop=(stop,))

    async def main():
        async with running(lm) as s:
            req = request("s", prompt, **params)
            events = await collect(s.engine.generate(req))
            assert await s.kv_freed()
            return req, events, s

    req, events, s = asyncio.run(main())
    assert text_of(events) == expected == reference(lm, prompt, **params)[1]
    assert ids_of(events) == ref_ids[:n_tokens]
    final = events[-1]
    assert isinstance(final, FinalEvent) and final.finish_reason is FinishReason.STOP
    assert final.completion_tokens == n_tokens and req.state is RequestState.FINISHED
    assert s.decode_calls.calls["abort"] == 0, "a stop on the decode side needs no abort call"
    assert s.decode_calls.calls["submit"] == 1


def test_abort_while_queued_for_prefill(lm, prompt):
    async def main():
        async with running(lm) as s:
            s.sink.gate("blocker")  # holds the prefill worker's batch (its KV commit) at the gate
            blocker = asyncio.create_task(collect(s.engine.generate(request("blocker", prompt, max_tokens=2))))
            await asyncio.to_thread(s.sink.reached["blocker"].wait, 60)
            req = request("q", prompt, max_tokens=8)
            task = asyncio.create_task(collect(s.engine.generate(req)))
            while "q" not in map(request_id_of, s.prefill._jobs):
                await asyncio.sleep(0.001)
            assert req.state is RequestState.PREFILLING and await s.engine.abort("q")
            events = await task
            s.sink.gates["blocker"].set()
            await blocker
            assert await s.kv_freed()
            return req, events

    req, events = asyncio.run(main())
    assert [type(e) for e in events] == [FinalEvent] and events[0].finish_reason is FinishReason.ABORT
    assert (req.state, req.finish_reason) == (RequestState.ABORTED, FinishReason.ABORT)


def test_abort_during_the_kv_transfer(lm, prompt):
    async def main():
        async with running(lm) as s:
            s.sink.gate("t")
            req = request("t", prompt, max_tokens=8)
            task = asyncio.create_task(collect(s.engine.generate(req)))
            await asyncio.to_thread(s.sink.reached["t"].wait, 60)  # blocks reserved, layer 0 written
            assert (await s.decode.load()).free_blocks < (await s.decode.load()).total_blocks
            assert await s.engine.abort("t")
            s.sink.gates["t"].set()
            events = await task
            assert await s.kv_freed()
            return req, events, s

    req, events, s = asyncio.run(main())
    assert [type(e) for e in events] == [FinalEvent] and events[0].finish_reason is FinishReason.ABORT
    assert req.state is RequestState.ABORTED and s.decode_calls.calls["submit"] == 0


def test_client_leaves_after_the_first_token(lm, prompt):
    async def main():
        async with running(lm) as s:
            req = request("f", prompt, max_tokens=200, ignore_eos=True)
            events = s.engine.generate(req)
            first = await anext(events)
            await events.aclose()  # the frontend's stream was cancelled
            assert await s.kv_freed()
            return req, first, s

    req, first, s = asyncio.run(main())
    assert isinstance(first, TokenEvent) and len(first.token_ids) >= 1
    assert (req.state, req.finish_reason) == (RequestState.ABORTED, FinishReason.ABORT)
    assert s.decode_calls.calls["abort"] == 1


def test_abort_rpc_while_decoding(lm, prompt):
    async def main():
        async with running(lm) as s:
            req = request("d", prompt, max_tokens=200, ignore_eos=True)
            events, got = s.engine.generate(req), []
            while sum(len(e.token_ids) for e in got) < 4:
                got.append(await anext(events))
            assert req.state is RequestState.DECODING and await s.engine.abort("d")
            got += [e async for e in events]
            assert await s.kv_freed()
            return req, got

    req, events = asyncio.run(main())
    final = events[-1]
    assert isinstance(final, FinalEvent) and final.finish_reason is FinishReason.ABORT
    assert 4 <= final.completion_tokens == len(ids_of(events)) < 200
    assert req.state is RequestState.ABORTED


class _DyingDecode(LocalCalls):
    """The decode worker is unreachable from the submit on (its KV receiver still took the transfer).
    Aborts still reach it, so that the engine's release of the KV shows."""

    dead = False

    async def __call__(self, method, *args):
        self.dead = self.dead or method == "submit"
        if self.dead and method != "abort":
            self.calls[method] += 1
            raise WorkerUnavailable("decode-0", "RayActorError")
        return await super().__call__(method, *args)


def test_a_worker_failure_with_no_other_worker_gives_unavailable_naming_both(lm, prompt):
    """The only decode worker dies at the submit: the engine tries to migrate, finds no healthy decode
    worker, and says so (migration itself: tests/integration/test_worker_failure.py)."""
    async def main():
        async with running(lm, decode_calls=_DyingDecode) as s:
            req = request("w", prompt, max_tokens=8)
            events = await collect(s.engine.generate(req))
            assert await s.kv_freed()  # the engine's abort released the committed KV
            return req, events, s

    req, events, s = asyncio.run(main())
    assert events == [ErrorEvent(Failure("UNAVAILABLE", "worker decode-0 is unavailable (RayActorError); no worker "
                                                        "to migrate to (no healthy decode worker)"))]
    assert "decode-0" in s.engine.workers.unhealthy and not s.engine.workers.views()[1][0].healthy
    assert (req.state, req.failure) == (RequestState.FAILED, events[0].failure)


def test_migrations_stop_at_the_limit_naming_the_workers_lost(lm, prompt):
    async def main():
        async with running(lm, decode_calls=_DyingDecode) as s:
            s.engine.max_migrations = 0
            req = request("m", prompt, max_tokens=8)
            return await collect(s.engine.generate(req))

    events = asyncio.run(main())
    assert events == [ErrorEvent(Failure("UNAVAILABLE", "worker decode-0 is unavailable (RayActorError); gave up "
                                                        "after 0 migrations (workers lost: decode-0)"))]


class _FreezingDecode(LocalCalls):
    """SIGSTOP seen from the engine: once frozen, no call is answered until thawed; then each runs, in
    order (Ray delivers a stopped actor's queued calls when it resumes). The worker itself keeps
    stepping, so its stale attempt has chunks to send when it resumes."""

    def __init__(self, worker):
        super().__init__(worker)
        self.thawed = asyncio.Event()
        self.thawed.set()

    async def __call__(self, method, *args):
        await self.thawed.wait()
        return await super().__call__(method, *args)


def test_a_stalled_decode_worker_is_declared_lost_and_its_request_migrates_fenced(lm, prompt):
    """decode-0 freezes after the request's first tokens: within the stall timeout the request
    migrates to decode-1 and streams the greedy reference on; when decode-0 resumes, its stale
    attempt's output is dropped (fenced by the attempt's key) and the abort it gets frees its KV."""
    ref_ids, _ = reference(lm, prompt, max_tokens=24, ignore_eos=True)

    async def main():
        async with running(lm, decode_calls=_FreezingDecode, n_decode=2, stall_timeout_s=0.6) as s:
            req = request("s", prompt, max_tokens=24, ignore_eos=True)
            events, gen = [], s.engine.generate(req)
            async for ev in gen:
                events.append(ev)
                if isinstance(ev, TokenEvent) and s.decode_calls.thawed.is_set():
                    s.decode_calls.thawed.clear()  # frozen mid-stream
            assert "decode-0" in s.engine.workers.unhealthy
            s.decode_calls.thawed.set()
            assert await s.kv_freed(s.decodes[0]) and await s.kv_freed(s.decodes[1])
            return events

    events = asyncio.run(main())
    final = events[-1]
    assert isinstance(final, FinalEvent), final
    assert (final.migrations, final.decode_worker, final.finish_reason) == (1, "decode-1", FinishReason.LENGTH)
    assert ids_of(events) == ref_ids
    indices = [ev.index for ev in events if isinstance(ev, TokenEvent)]
    assert indices == sorted(set(indices)) and indices[0] == 0  # no chunk twice, none from the stale attempt


@pytest.mark.parametrize("kind", ["corrupt", "stall", "truncate"])
def test_a_failed_kv_transfer_is_retried_on_another_decode_worker(lm, prompt, kind):
    """The first transfer (to decode-0) suffers an injected fault: the request is prefilled again for
    decode-1 and completes exactly; decode-0 stays healthy, and neither pool holds a block after."""
    ref_ids, _ = reference(lm, prompt, max_tokens=8, ignore_eos=True)

    async def main():
        async with running(lm, n_decode=2) as s:
            s.prefill.transfer.config = SenderConfig(stall_timeout_s=0.3)
            s.prefill.transfer.faults.arm(kind)
            req = request("k", prompt, max_tokens=8, ignore_eos=True)
            events = await collect(s.engine.generate(req))
            assert await s.kv_freed(s.decodes[0]) and await s.kv_freed(s.decodes[1])
            return events, s

    events, s = asyncio.run(main())
    final = events[-1]
    assert isinstance(final, FinalEvent), final
    assert (final.migrations, final.decode_worker) == (1, "decode-1") and ids_of(events) == ref_ids
    assert s.prefill.transfer.faults.fired == {kind: 1} and not s.engine.workers.unhealthy


def test_a_finished_request_teaches_the_decode_corrections_from_what_its_worker_measured(lm, prompt):
    """Its mean step against the forecast ("sharing": once its worker's arrivals meter has watched a
    window, here 1 ms), its TPOT against the predicted wait plus that measured time ("tpot"); a request
    of too few gaps teaches neither."""
    async def main():
        async with running(lm) as s:
            s.engine.workers._pending["decode-0"].arrivals = DecodeArrivals(window_s=1e-3)
            few = request("short", prompt, max_tokens=TPOT_MIN_GAPS, ignore_eos=True)
            short = await collect(s.engine.generate(few))
            corr = s.engine.router.predictor.corrections
            before = (corr.samples("decode-0", "sharing"), corr.samples("decode-0", "tpot"))
            long = await collect(s.engine.generate(request("long", prompt, max_tokens=24, ignore_eos=True)))
            return short[-1], long[-1], before, corr

    short, final, before, corr = asyncio.run(main())
    assert short.completion_tokens == TPOT_MIN_GAPS and before == (0, 0)
    assert final.completion_tokens == 24
    assert (corr.samples("decode-0", "sharing"), corr.samples("decode-0", "tpot")) == (1, 1)
    (ratio,), (extra_s,) = corr._ratios[("decode-0", "sharing")], corr._ratios[("decode-0", "tpot")]
    assert 0.2 < ratio < 5  # seconds against seconds: a lone sequence's measured step near its forecast
    tpot_s = final.timings.mean_tpot_ms / 1e3
    assert abs(extra_s) < tpot_s  # what lies outside its steps, per gap: less than a whole step


def test_no_placement_is_a_rejection(lm, prompt):
    async def main():
        async with running(lm) as s:
            req = request("r", prompt, max_tokens=4000)  # more than the decode pool's 2048 tokens
            return req, await collect(s.engine.generate(req)), s

    req, events, s = asyncio.run(main())
    assert len(events) == 1 and events[0].failure.code == "RESOURCE_EXHAUSTED"
    assert req.state is RequestState.REJECTED and req.failure == events[0].failure
    assert sum(s.prefill_calls.calls.values()) == s.prefill_calls.calls["load"]  # no worker saw it


def test_the_engine_imports_no_ray():
    code = "import sys, orchestrator.serving.engine; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"
