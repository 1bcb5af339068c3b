"""The SLA router on real workers in one process (no Ray): a saturated decode worker is avoided, and a
short prompt is prefilled by a decode worker itself when that is predicted sooner.

Two DecodeWorkers and a PrefillWorker with the real model, KV over the in-process backend, the engine
with the `sla` policy and corrections already warm (ratio 1, as if it had served for a while).
decode-0 is filled to its batch limit with long-running sequences of another owner: an interactive
request predicted to wait behind them for a slot would miss its TPOT target, so it goes to decode-1.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from decode.worker import DecodeWorker
from kvtransfer.inprocess import InProcessBackend
from kvtransfer.receiver import KVReceiver
from model.sampling import SamplingParams, make_rng, sample_one
from model.tokenizer import ChatMessage
from orchestrator.core.correction import Corrections
from orchestrator.core.predictor import Predictor
from orchestrator.core.request import Request, SLATarget
from orchestrator.core.router import Router
from orchestrator.serving.engine import Engine, FinalEvent, TokenEvent
from orchestrator.serving.perfmodel import live_deployment
from orchestrator.serving.workers import DecodeHandle, LocalCalls, Pools, PrefillHandle
from prefill.worker import PrefillWorker

INTERACTIVE = SLATarget(ttft_ms=60_000, tpot_ms=2_000, priority=2, sla_class="interactive")


def _warm_router(local_prefill_max_tokens: int = 0, prefill_ratio: float = 1.0) -> Router:
    corr = Corrections()
    for _ in range(corr.min_samples):
        corr.observe("prefill-0", "prefill", prefill_ratio, 1.0)
        for w in ("decode-0", "decode-1"):
            corr.observe(w, "decode", 1.0, 1.0)
            corr.observe(w, "local_prefill", 1.0, 1.0)
    return Router("sla", Predictor(corr), local_prefill_max_tokens=local_prefill_max_tokens)


def _stack(lm, router: Router, local_chunk_tokens: int = 0):
    """(decode workers by id, the engine) over one prefill worker; start the workers and the engine."""
    decode = {w: DecodeWorker(capacity_tokens=4096, block_size=16, max_batch=4, blas_threads=1, loaded=lm,
                              local_chunk_tokens=local_chunk_tokens) for w in ("decode-0", "decode-1")}
    backend = InProcessBackend({w: KVReceiver(d.kv_sink, expected_layout=d.layout) for w, d in decode.items()})
    prefill = PrefillWorker("prefill-0", blas_threads=1, transfer_backend=backend, loaded=lm)
    pools = Pools(prefill={"prefill-0": PrefillHandle("prefill-0", LocalCalls(prefill))},
                  decode={w: DecodeHandle(w, LocalCalls(d)) for w, d in decode.items()},
                  kv_targets={w: w for w in decode})
    return decode, Engine(pools, router, live_deployment("smollm2-135m")[0], decode_max_batch=4,
                          local_chunk_tokens=local_chunk_tokens)


async def _serve(engine: Engine, prompt: list[int], n: int, max_tokens: int = 8):
    """n requests one after another: (their token ids, their finals)."""
    outs, finals = [], []
    for i in range(n):
        req = Request(f"chat-{i}", list(prompt), SamplingParams(max_tokens=max_tokens), INTERACTIVE, time.monotonic())
        events = [ev async for ev in engine.generate(req)]
        outs.append([t for ev in events if isinstance(ev, TokenEvent) for t in ev.token_ids])
        finals += [ev for ev in events if isinstance(ev, FinalEvent)]
    return outs, finals


def test_interactive_requests_avoid_the_saturated_decode_worker(lm):
    prompt = lm.tokenizer.chat_ids([ChatMessage("user", "Name a colour.")])

    async def main():
        decode, engine = _stack(lm, _warm_router())
        for d in decode.values():
            await d.start()
        logits, ks, vs = lm.model.prefill(prompt)
        long = SamplingParams(max_tokens=2000, ignore_eos=True)
        for i in range(4):  # decode-0's whole batch, for thousands of steps
            await decode["decode-0"].accept_kv(f"busy-{i}", ks, vs, sample_one(logits, long, make_rng(long)), long,
                                              prompt, "other")
        await engine.start()
        await asyncio.sleep(0.3)  # a few load refreshes: the engine sees decode-0 full
        _, finals = await _serve(engine, prompt, 3)
        busy = await decode["decode-0"].load()
        for i in range(4):
            await decode["decode-0"].abort(f"busy-{i}")
        await engine.stop()
        for d in decode.values():
            await d.close()
        return finals, busy

    finals, busy = asyncio.run(asyncio.wait_for(main(), 240))
    assert busy.active == 4  # still saturated when the interactive requests were placed
    assert [f.decode_worker for f in finals] == ["decode-1"] * 3
    assert all(f.prediction is not None and f.prediction.tpot_bound_ms <= INTERACTIVE.tpot_ms for f in finals)


@pytest.mark.parametrize("chunk", [0, 5])  # whole, or chunked (run whole too: nothing else decodes there)
def test_a_short_prompt_is_prefilled_on_the_decode_worker_with_the_same_tokens(lm, chunk):
    """The prefill worker has been seen running ten times slower than its model (a contended host): the
    decode workers' own prefill (same model, no transfer) is predicted to finish sooner, for prompts
    short enough for it, even once their own corrections learn how slow this machine is."""
    prompt = lm.tokenizer.chat_ids([ChatMessage("user", "Name a colour.")])

    async def main(local: int):
        decode, engine = _stack(lm, _warm_router(local, prefill_ratio=10.0), chunk)
        await engine.start()
        states = [v.state for v in engine.workers.views()[1]]  # the router predicts the chunking the workers do
        assert all(st.chunk_tokens == chunk for st in states)
        try:
            outs, finals = await _serve(engine, prompt, 3)
            await asyncio.sleep(0.3)  # load refreshes: the local prefills reach the corrections
            loads = {w: await d.load() for w, d in decode.items()}
            corr = engine.router.predictor.corrections
            observed = sum(corr.samples(w, "local_prefill") - corr.min_samples for w in decode)
        finally:
            await engine.stop()
            for d in decode.values():
                await d.close()
        return outs, finals, loads, observed

    outs, finals, loads, observed = asyncio.run(asyncio.wait_for(main(len(prompt)), 240))
    assert all(f.prefill_worker == f.decode_worker and f.timings.transfer_ms == 0 for f in finals), finals
    assert observed == 3  # each local prefill, reported by its worker, observed by the "local_prefill" correction
    assert all(l.free_blocks == l.total_blocks for l in loads.values())  # nothing held after
    remote_outs, remote_finals, _, _ = asyncio.run(asyncio.wait_for(main(len(prompt) - 1), 240))  # too long for it
    assert all(f.prefill_worker == "prefill-0" for f in remote_finals)
    assert outs == remote_outs  # greedy: the same tokens whichever side prefilled
