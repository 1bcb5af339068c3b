"""The SLA router on a live Ray deployment (1 prefill + 2 decode workers, batch 4 each, real gRPC).

decode-0 is saturated from outside the engine: four long sequences of another owner fill its batch
for about a thousand steps. Interactive requests are predicted to wait behind them for a slot and
miss their TPOT target there, so the router sends every one to decode-1. Then the prefill worker is
made to look ten times slower than its model: short prompts are prefilled by a decode worker
itself (conditional disaggregation), through Ray, with the same tokens as the disaggregated path.
"""
from __future__ import annotations

import time

import pytest

from model.finish import FinishReason
from model.generation import NEAR_TIE_MARGIN, greedy_reference
from model.loaded import load_model
from model.sampling import SamplingParams, make_rng, sample_one
from model.tokenizer import ChatMessage
from orchestrator import client as cl
from tests.integration.stack import cluster_tree, config_of, running, wait_kv_free

pytestmark = pytest.mark.integration
PROMPT = "Name a colour."


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tree = cluster_tree()
    meta = tree["metadata"]
    meta["pools"]["decode"].update(workers=2, max_batch=4, kv_capacity_tokens=8192)
    meta["router"].update(policy="sla", local_prefill_max_tokens=64)
    # targets a slow or loaded machine meets on an idle worker (cluster.yaml's 200 ms TPOT is not:
    # a CI run saw 208 ms predicted), still missed by far behind a saturated batch (~1000 steps' wait)
    meta["sla_classes"]["interactive"] = {"ttft_ms": 10000, "tpot_ms": 1000, "priority": 2}
    with running(config_of(tree, tmp_path_factory.mktemp("cfg"))) as run:
        yield run


@pytest.fixture(scope="module")
def lm():
    return load_model()


@pytest.fixture(scope="module")
def client(stack):
    with cl.Client(stack.dep.target, timeout=120) as c:
        yield c


def _saturate(stack, lm, n: int) -> list[str]:
    """Fill decode-0's batch with n long sequences handed to it directly (another owner's)."""
    prompt = lm.tokenizer.chat_ids([ChatMessage("user", "Tell me about the sea.")])
    logits, ks, vs = lm.model.prefill(prompt)
    long = SamplingParams(max_tokens=1000, ignore_eos=True)
    actor = stack.dep.pools.actors["decode-0"]
    ids = [f"busy-{i}" for i in range(n)]
    stack.ray_get(lambda: [actor.accept_kv.remote(rid, ks, vs, sample_one(logits, long, make_rng(long)), long, prompt,
                                                  "other") for rid in ids])
    return ids


def _load(stack, worker: str):
    return stack.ray_get(lambda: [stack.dep.pools.actors[worker].load.remote()])[0]


def test_interactive_requests_avoid_the_saturated_decode_worker(stack, client, lm):
    busy = _saturate(stack, lm, 4)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the engine's view must show it full before the test means anything
            if _load(stack, "decode-0").active == 4:
                break
            time.sleep(0.05)
        time.sleep(0.2)  # a few load refreshes
        finals = [client.complete(messages=[("user", PROMPT)], max_tokens=8, sla_class="interactive").final
                  for _ in range(3)]
        still = _load(stack, "decode-0")
    finally:
        stack.ray_get(lambda: [stack.dep.pools.actors["decode-0"].abort.remote(rid) for rid in busy])
    assert still.active == 4  # saturated the whole time
    assert [f.decode_worker for f in finals] == ["decode-1"] * 3


def test_a_short_prompt_is_prefilled_by_a_decode_worker_through_ray(stack, client, lm):
    ids = lm.tokenizer.chat_ids([ChatMessage("user", PROMPT)])
    ref, margins = greedy_reference(lm.model, ids, 8, lm.tokenizer.stop_token_ids)
    ref = [t for t in ref if t not in lm.tokenizer.stop_token_ids]
    corr = stack.dep.engine.router.predictor.corrections

    def slow_prefill_worker():
        for _ in range(corr.min_samples):
            corr.observe("prefill-0", "prefill", 10.0, 1.0)
    stack.call(slow_prefill_worker)
    got = [client.complete(messages=[("user", PROMPT)], max_tokens=8, sla_class="interactive") for _ in range(2)]
    assert all(c.final.prefill_worker == c.final.decode_worker for c in got), [c.final for c in got]
    assert all(c.final.timings.transfer_ms == 0 for c in got), [c.final.timings for c in got]
    for c in got:  # greedy: the in-process reference's tokens (a divergence only at a near-tie, DESIGN.md)
        diff = next((j for j, (a, b) in enumerate(zip(c.token_ids, ref)) if a != b), None)
        assert (diff is None and list(c.token_ids) == ref) or margins[diff] < NEAR_TIE_MARGIN
    assert wait_kv_free(client)


def test_cancel_and_abort_of_locally_prefilled_requests_free_the_kv(stack, client):
    """After the test above the router prefers local prefill for short prompts: end two mid-stream."""
    cancelled = client.generate(messages=[("user", PROMPT)], max_tokens=200, ignore_eos=True)
    next(iter(cancelled))
    cancelled.cancel()
    aborted = client.generate(messages=[("user", PROMPT)], max_tokens=200, ignore_eos=True, request_id="local-abort")
    chunks = iter(aborted)
    got = len(next(chunks).token_ids)
    assert client.abort("local-abort")
    got += sum(len(c.token_ids) for c in chunks)
    final = aborted.final
    assert final.finish_reason is FinishReason.ABORT and final.prefill_worker == final.decode_worker and got < 200
    assert wait_kv_free(client)
