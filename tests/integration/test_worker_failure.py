"""Worker actors failing under a live deployment (2 prefill + 3 decode workers, real Ray).

In file order: a decode actor crashes and Ray restarts it (it serves again, on a new KV port); a
decode actor's process is frozen (SIGSTOP) under a greedy stream, declared lost within the stall
timeout and resumed (the request migrates; the stale attempt's output never arrives; its KV is
freed); a decode actor dies for good under a greedy stream, then another under a seeded sampled one
(each request migrates to a survivor and streams exactly what the uninterrupted run would; the
router skips the dead); a prefill actor dies with prefills queued and running on it (they are placed
again and complete); the last prefill actor dies (requests are turned away with UNAVAILABLE)."""
from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request

import pytest
import ray

from model.generation import follows_greedy, generate, greedy_reference
from model.loaded import load_model
from model.sampling import SamplingParams
from model.tokenizer import ChatMessage
from orchestrator import client as cl
from tests.integration.stack import cluster_tree, config_of, running, wait_kv_free

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tree = cluster_tree()
    tree["metadata"]["pools"]["decode"]["workers"] = 3
    tree["metadata"]["pools"]["prefill"]["workers"] = 2
    tree["metadata"]["pools"]["decode"]["kv_capacity_tokens"] = 4096
    tree["metadata"]["router"]["policy"] = "least_loaded"  # idle workers tie: the lowest id wins
    with running(config_of(tree, tmp_path_factory.mktemp("cfg"))) as run:
        yield run


@pytest.fixture(scope="module")
def deployment(stack):
    return stack.dep


@pytest.fixture(scope="module")
def lm():
    return load_model()


def _decode_workers(c: cl.Client) -> dict:
    return {w.worker_id: w for p in c.server_info().pools if p.name == "decode" for w in p.workers}


def test_a_crashed_decode_worker_is_restarted_and_serves_again(deployment):
    with cl.Client(deployment.target, timeout=120) as c:
        before = deployment.pools.kv_targets["decode-0"]
        assert c.complete("Warm up.", max_tokens=4).final.decode_worker == "decode-0"  # ties go to decode-0
        ray.kill(deployment.pools.actors["decode-0"], no_restart=False)  # a crash: Ray restarts the actor
        deadline = time.monotonic() + 60
        while deployment.pools.kv_targets["decode-0"] == before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert deployment.pools.kv_targets["decode-0"] != before  # its new receiver, learned from load()
        while not _decode_workers(c)["decode-0"].healthy and time.monotonic() < deadline:
            time.sleep(0.2)
        done = c.complete("Say hello.", max_tokens=8)
        assert done.final.decode_worker == "decode-0" and done.final.usage.completion_tokens >= 1


def _busy_decode_worker(c: cl.Client) -> str:
    """The one decode worker decoding now. server_info shows the engine's last load reports, which can
    still count a request as waiting (KV committed, not yet admitted) a few tokens in: poll."""
    deadline = time.monotonic() + 10
    busy = []
    while not busy and time.monotonic() < deadline:
        busy = [w for w, info in _decode_workers(c).items() if info.active_requests > 0 and info.healthy]
        time.sleep(0.05)
    assert len(busy) == 1, _decode_workers(c)  # (a dead worker keeps its last report: not counted)
    return busy[0]


def _greedy(lm, prompt: str, n: int):
    ids = lm.tokenizer.chat_ids([ChatMessage("user", prompt)])
    return greedy_reference(lm.model, ids, n, lm.tokenizer.stop_token_ids)


def test_a_frozen_decode_worker_is_declared_lost_and_its_stale_output_never_arrives(stack, deployment, lm):
    """SIGSTOP of the busy decode actor's process mid-stream: within the stall timeout (2 s) the
    request migrates and completes exactly; after SIGCONT the worker is healthy again, nothing more
    arrives on the finished stream, and the stale attempt's KV is freed (its abort ran on resume)."""
    prompt = "Describe a lighthouse at night in detail."
    ref, margins = _greedy(lm, prompt, 48)
    with cl.Client(deployment.target, timeout=120) as c:
        stream = c.generate(messages=[("user", prompt)], max_tokens=48, ignore_eos=True)
        chunks = iter(stream)
        got = [t for _ in range(3) for t in next(chunks).token_ids]
        frozen = _busy_decode_worker(c)
        _, pid = stack.ray_get(lambda: [deployment.pools.actors[frozen].process.remote()])[0]
        os.kill(pid, signal.SIGSTOP)
        try:
            got += [t for chunk in chunks for t in chunk.token_ids]
            final = stream.final
        finally:
            os.kill(pid, signal.SIGCONT)
        assert final.migrations == 1 and final.decode_worker != frozen
        assert len(got) == len(ref) and follows_greedy(got, ref, margins), got
        deadline = time.monotonic() + 30
        while not _decode_workers(c)[frozen].healthy and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _decode_workers(c)[frozen].healthy  # it answers again: routable again
        assert wait_kv_free(c, 30)


def test_a_decode_worker_death_mid_stream_migrates_its_request_without_losing_a_token(deployment, lm):
    """SIGKILL-like death (ray.kill, no restart) after a few chunks: the request is placed on the other
    decode worker, prompt + the tokens already streamed are prefilled again, and the stream goes on:
    contiguous indices (the client checks them), the uninterrupted greedy run's tokens, one migration."""
    prompt = "Tell me a long story about the sea."
    ids = lm.tokenizer.chat_ids([ChatMessage("user", prompt)])
    ref, margins = greedy_reference(lm.model, ids, 60, lm.tokenizer.stop_token_ids)
    with cl.Client(deployment.target, timeout=120) as c:
        stream = c.generate(messages=[("user", prompt)], max_tokens=60, ignore_eos=True)
        chunks = iter(stream)
        got = [t for _ in range(3) for t in next(chunks).token_ids]
        dead = _busy_decode_worker(c)
        ray.kill(deployment.pools.actors[dead], no_restart=True)
        got += [t for chunk in chunks for t in chunk.token_ids]
        final = stream.final
        assert final.migrations == 1 and final.decode_worker != dead and final.usage.completion_tokens == 60
        assert len(got) == 60
        assert follows_greedy(got, ref, margins), f"diverged from {ref} (exactness rule: only at a near-tie)"

        deadline = time.monotonic() + 10
        while _decode_workers(c)[dead].healthy and time.monotonic() < deadline:
            time.sleep(0.1)
        health = {w: info.healthy for w, info in _decode_workers(c).items()}
        assert health[dead] is False and sum(health.values()) == 2, health
        with urllib.request.urlopen(deployment.metrics_url, timeout=10) as r:
            metrics = r.read().decode()
        assert f'pdorch_worker_healthy{{pool="decode",worker="{dead}"}} 0.0' in metrics
        assert 'code="UNAVAILABLE"' not in metrics  # nothing failed

        for i in range(3):  # every new request lands on the surviving worker and completes
            done = c.complete(f"Say hello number {i}.", max_tokens=8)
            assert done.final.decode_worker != dead and done.final.usage.completion_tokens >= 1
        assert c.health() == "SERVING"


def test_a_migrated_seeded_request_continues_its_random_stream(deployment, lm):
    """Runs after the test above: a second decode worker dies under a seeded sampled request; on the
    last one its stream goes on with the in-process seeded run's tokens (each took one random draw)."""
    params = dict(max_tokens=120, temperature=0.8, top_p=0.9, seed=21, ignore_eos=True)
    prompt = "Write a poem about copper."
    ids = lm.tokenizer.chat_ids([ChatMessage("user", prompt)])
    expected = [t.token_id for t in generate(lm.model, lm.tokenizer, ids, SamplingParams(**params))]
    with cl.Client(deployment.target, timeout=120) as c:
        stream = c.generate(messages=[("user", prompt)], **params)
        chunks = iter(stream)
        got = [t for _ in range(3) for t in next(chunks).token_ids]
        dead = _busy_decode_worker(c)
        ray.kill(deployment.pools.actors[dead], no_restart=True)
        got += [t for chunk in chunks for t in chunk.token_ids]
        assert stream.final.migrations == 1 and stream.final.decode_worker != dead
        assert got == expected


def test_a_prefill_worker_death_replaces_its_queued_and_running_prefills(deployment):
    """Six long prompts at once: both prefill workers have work; the one with prefills queued behind
    its running batch is killed, and every request is placed again and completes in full."""
    prompts = [f"Number {i}: " + "describe the history of the printing press in great detail. " * 40
               for i in range(6)]
    done: dict[int, object] = {}

    def send(i: int) -> None:
        with cl.Client(deployment.target, timeout=120) as c:
            done[i] = c.complete(prompts[i], max_tokens=6, ignore_eos=True)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    with cl.Client(deployment.target, timeout=120) as c:
        for t in threads:
            t.start()
        victim, deadline = None, time.monotonic() + 30
        while victim is None and time.monotonic() < deadline:
            prefill = [w for p in c.server_info().pools if p.name == "prefill" for w in p.workers]
            busy = [w for w in prefill if w.active_requests and w.queued_requests]
            victim = busy[0].worker_id if busy else None
            time.sleep(0.02)
        assert victim is not None, "no prefill worker had a batch running and prompts queued"
        ray.kill(deployment.pools.actors[victim], no_restart=True)
        for t in threads:
            t.join(120)
        assert sorted(done) == list(range(6))
        assert all(d.final.usage.completion_tokens == 6 and d.final.prefill_worker != victim for d in done.values())
        assert sum(d.final.migrations for d in done.values()) >= 2  # at least its running and queued ones
        assert wait_kv_free(c, 30)


def test_prefill_worker_death_turns_requests_away_with_unavailable(deployment):
    """Runs after the test above: kills the last prefill worker."""
    with cl.Client(deployment.target, timeout=120) as c:
        (worker,) = [w for w in deployment.pools.prefill if w in _healthy_prefill(c)]
        ray.kill(deployment.pools.actors[worker], no_restart=True)
        with pytest.raises(cl.Unavailable):  # placed before the refresh noticed, or rejected after
            c.complete("Hello?", max_tokens=4)
        deadline = time.monotonic() + 10
        while worker in _healthy_prefill(c) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _healthy_prefill(c)
        with pytest.raises(cl.Unavailable, match="no healthy prefill worker"):
            c.complete("Hello again?", max_tokens=4)
        assert c.health() == "SERVING" and c.model_info().n_layers == 30


def _healthy_prefill(c: cl.Client) -> set[str]:
    return {w.worker_id for p in c.server_info().pools if p.name == "prefill" for w in p.workers if w.healthy}
