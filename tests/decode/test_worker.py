"""DecodeWorker in process (no Ray): handoff, streaming, bad input, aborts, sampling, load."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from decode.worker import DecodeWorker
from kvtransfer.layout import KVLayout
from kvtransfer.sink import KVRefused
from model.finish import FinishReason
from model.generation import generate
from model.sampling import SamplingParams, make_rng, sample_one
from tests.decode.driver import judge


def worker(lm, **kw) -> DecodeWorker:
    return DecodeWorker(capacity_tokens=kw.pop("capacity_tokens", 2048), block_size=16, max_batch=8,
                        blas_threads=1, loaded=lm, **kw)


async def drain(w: DecodeWorker, rid: str, start: int = 0):
    """(token ids, text, last chunk) of a request whose stream starts at index `start`."""
    ids, texts = [], []
    while True:
        chunk = await w.next_tokens(rid, timeout=60)
        assert chunk.start_index == start + len(ids)
        ids += chunk.token_ids
        texts += chunk.texts
        if chunk.finished:
            return ids, "".join(texts), chunk


async def hand_off(w: DecodeWorker, rid: str, ref, max_tokens: int, **params):
    await w.accept_kv(rid, ref.ks, ref.vs, ref.tokens[0], SamplingParams(max_tokens=max_tokens, **params),
                      prompt_ids=ref.prompt)


async def started(w: DecodeWorker, rid: str, ref, max_tokens: int):
    """Hand `ref` off and wait for its first chunk."""
    await hand_off(w, rid, ref, max_tokens=max_tokens)
    return await w.next_tokens(rid, timeout=60)


def _transfer(w: DecodeWorker, rid: str, ref) -> None:
    """The KV of `ref` into the worker's sink, as the kvtransfer receiver writes it."""
    sink = w.kv_sink
    sink.open(rid, w.layout, len(ref.prompt))
    for layer, (k, v) in enumerate(zip(ref.ks, ref.vs)):
        sink.write(rid, layer, 0, k, v)
    sink.commit(rid)


def assert_all_blocks_free(w: DecodeWorker) -> None:
    alloc = w.kv_sink.allocator
    assert alloc.free_blocks == alloc.n_blocks, (alloc.free_blocks, alloc.n_blocks)


def run(lm, body, **kw) -> None:
    """`await body(w)` on a fresh worker (worker(lm, **kw)), closed afterwards whatever happens."""
    async def main():
        w = worker(lm, **kw)
        try:
            await body(w)
        finally:
            await w.close()
    asyncio.run(main())


def test_streams_exact_tokens_for_concurrent_requests(lm, book):
    async def body(w: DecodeWorker):
        refs = [book.get(i) for i in (0, 5, 9)]
        for i, ref in enumerate(refs):
            await hand_off(w, f"r{i}", ref, max_tokens=8 + i)
        results = await asyncio.gather(*(drain(w, f"r{i}") for i in range(3)))
        for (ids, text, last), ref, i in zip(results, refs, range(3)):
            ok, _ = judge(tuple(ids), ref, True, 8 + i)
            assert ok, (ids, ref.tokens)
            assert last.finish_reason is FinishReason.LENGTH and text == lm.tokenizer.decode(ids)
        load = await w.load()
        assert load.active == 0 and load.free_blocks == load.total_blocks and w.steps > 0
    run(lm, body)


def test_submit_before_kv_arrives_through_the_sink_from_another_thread(lm, book):
    async def body(w: DecodeWorker):
        ref = book.get(3)
        await w.submit("r", ref.tokens[0], SamplingParams(max_tokens=6), prompt_ids=ref.prompt)
        t = threading.Thread(target=_transfer, args=(w, "r", ref))
        t.start()
        ids, _, last = await drain(w, "r")
        t.join()
        assert ids == ref.tokens[:6] and last.finish_reason is FinishReason.LENGTH
    run(lm, body)


def test_bad_layout_and_oversized_requests_are_refused_without_disturbing_the_batch(lm, book):
    async def body(w: DecodeWorker):
        good = book.get(4)
        await hand_off(w, "good", good, max_tokens=12)
        bad = KVLayout(w.layout.n_layers, w.layout.n_kv_heads + 1, w.layout.head_dim)
        with pytest.raises(KVRefused) as e:
            w.kv_sink.open("bad", bad, 10)
        assert e.value.code == "INVALID_ARGUMENT" and "n_kv_heads" in str(e.value)
        with pytest.raises(KVRefused) as e:  # wrong head_dim in the arrays themselves
            await w.accept_kv("bad2", [k[..., :32] for k in good.ks], [v[..., :32] for v in good.vs],
                              good.tokens[0], SamplingParams(max_tokens=4))
        assert e.value.code == "INVALID_ARGUMENT" and "head_dim" in str(e.value)
        with pytest.raises(KVRefused) as e:  # prompt + max_tokens beyond the pool: refused, not half-run
            await hand_off(w, "huge", good, max_tokens=500)
        assert e.value.code == "RESOURCE_EXHAUSTED"
        free = w.kv_sink.allocator.free_blocks
        with pytest.raises(KVRefused) as e:  # more prompt tokens than the free blocks hold
            w.kv_sink.open("toolong", w.layout, free * 16 + 1)
        assert e.value.code == "RESOURCE_EXHAUSTED" and w.kv_sink.state("toolong") is None
        ids, _, last = await drain(w, "good")
        assert ids == good.tokens[:12] and last.finish_reason is FinishReason.LENGTH
        assert_all_blocks_free(w)
    run(lm, body, capacity_tokens=512)


def test_abort_mid_stream_and_during_transfer_release_blocks(lm, book):
    async def body(w: DecodeWorker):
        ref = book.get(7)
        first = await started(w, "a", ref, max_tokens=16)
        await w.abort("a")
        rest = await w.next_tokens("a", timeout=60)
        while not rest.finished:
            rest = await w.next_tokens("a", timeout=60)
        assert rest.finish_reason is FinishReason.ABORT and len(first.token_ids) < 16
        w.kv_sink.open("t", w.layout, 20)  # a transfer in progress, aborted by the frontend
        await w.submit("t", 5, SamplingParams(max_tokens=4))
        await w.abort("t")
        assert (await w.next_tokens("t", timeout=5)).finish_reason is FinishReason.ABORT
        await asyncio.sleep(0.05)
        assert_all_blocks_free(w)
    run(lm, body)


def test_an_abort_that_overtakes_its_submit_ends_the_stream(lm, book):
    """An Abort RPC can reach the worker between the KV's commit and the engine's submit (or, on an
    async actor, ahead of a submit sent first): the submit must then end at once, not wait forever."""
    async def body(w: DecodeWorker):
        ref = book.get(2)
        await w.start()
        _transfer(w, "raced", ref)
        await asyncio.sleep(0.05)  # the commit callback runs on the loop
        await w.abort("raced")
        await w.submit("raced", ref.tokens[0], SamplingParams(max_tokens=8), prompt_ids=ref.prompt)
        last = await w.next_tokens("raced", timeout=5)
        assert last.finished and last.finish_reason is FinishReason.ABORT
        assert_all_blocks_free(w)
    run(lm, body)


@pytest.mark.parametrize("order", ["abort, kv", "abort, kv, submit", "submit, abort, drain, kv",
                                   "abort, submit, drain, kv", "kv+abort"])
def test_kv_that_arrives_after_its_abort_is_released(lm, book, order):
    """An aborted id stays ended: its KV, committed later in any order against the submit (a stalled
    transfer that resumes, a frozen worker resumed with frames queued), is released at once, and a
    submit of it ends with ABORT. Before, the late commit cleared the abort and held its blocks forever."""
    async def body(w: DecodeWorker):
        ref = book.get(2)
        await w.start()
        for step in order.split(", "):
            if step == "abort":
                await w.abort("late")
            elif step == "kv":
                _transfer(w, "late", ref)
            elif step == "kv+abort":  # the commit's callback and the abort queued on the loop together
                _transfer(w, "late", ref)
                await w.abort("late")
            elif step == "submit":
                await w.submit("late", ref.tokens[0], SamplingParams(max_tokens=8), prompt_ids=ref.prompt)
            elif step == "drain":
                assert (await w.next_tokens("late", timeout=5)).finish_reason is FinishReason.ABORT
            await asyncio.sleep(0.05)  # the commit callback runs on the loop
        if "submit" in order and "drain" not in order:
            assert (await w.next_tokens("late", timeout=5)).finish_reason is FinishReason.ABORT
        assert_all_blocks_free(w)
        assert (await w.load()).orphans_released == 0  # released by the abort rule, not the backstop
    run(lm, body)


def test_committed_kv_never_submitted_is_released_by_the_backstop(lm, book, monkeypatch):
    """KV whose engine died between the transfer and the submit: released after ORPHAN_KV_S, counted."""
    import decode.worker as worker_module
    monkeypatch.setattr(worker_module, "ORPHAN_KV_S", 0.2)

    async def body(w: DecodeWorker):
        await w.start()
        _transfer(w, "orphan", book.get(2))
        await asyncio.sleep(0.05)
        assert w.kv_sink.allocator.free_blocks < w.kv_sink.allocator.n_blocks
        for _ in range(40):
            await asyncio.sleep(0.05)
            if (await w.load()).orphans_released:
                break
        assert (await w.load()).orphans_released == 1
        assert_all_blocks_free(w)
    run(lm, body)


def test_seeded_sampling_and_stop_strings_match_in_process_generate(lm, book):
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=1234)
    ref = book.get(10)
    expected = [t.token_id for t in generate(lm.model, lm.tokenizer, ref.prompt, params)]
    logits, _, _ = lm.model.prefill(ref.prompt)
    first = sample_one(logits, params, make_rng(params))  # what the prefill side samples
    text_all = lm.tokenizer.decode(ref.tokens)
    stop = text_all[len(text_all) // 2:len(text_all) // 2 + 3]

    async def body(w: DecodeWorker):
        await w.accept_kv("s", ref.ks, ref.vs, first, params, prompt_ids=ref.prompt)
        await hand_off(w, "g", ref, max_tokens=16, stop=(stop,))
        (ids, _, _), (_, text, last) = await asyncio.gather(drain(w, "s"), drain(w, "g"))
        assert ids == expected
        assert last.finish_reason is FinishReason.STOP and stop not in text and text_all.startswith(text)
    run(lm, body)


def test_load_reports_batch_and_blocks(lm, book):
    async def body(w: DecodeWorker):
        ref = book.get(2)
        await started(w, "x", ref, max_tokens=16)
        load = await w.load()
        assert load.active + load.waiting == 1 and load.free_blocks < load.total_blocks
        assert load.context_tokens >= len(ref.prompt)
        while not load.steps:  # it is decoding: the steps it ran reach the next load, once
            await asyncio.sleep(0.01)
            load = await w.load()
        step = load.steps[-1]
        assert step.batch == 1 and step.context_tokens >= len(ref.prompt) and step.seconds > 0
        assert step.chunk_tokens == 0 and 0 < step.cpu_share <= 1
        later = (await w.load()).steps
        assert not set(load.steps) & set(later)
        await w.abort("x")
    run(lm, body)


def test_next_outputs_timeout_bounds_the_whole_call_while_another_owner_streams(lm, book):
    async def body(w: DecodeWorker):
        ref = book.get(3)
        params = SamplingParams(max_tokens=200, ignore_eos=True)  # streams for seconds, waking every step
        await w.accept_kv("busy", ref.ks, ref.vs, ref.tokens[0], params, ref.prompt, "other")
        await w.next_outputs("other", timeout=60)  # it is streaming
        assert await w.next_outputs("idle", timeout=0.3) == []  # not re-armed by "other"'s wakes
        chunks = await w.next_outputs("other", timeout=60)
        assert chunks and not chunks[-1].finished  # "idle" returned while "other" was still streaming
        await w.abort("busy")
    run(lm, body)


def test_next_outputs_multiplexes_one_owners_requests_and_forgets_finished_ones(lm, book):
    async def body(w: DecodeWorker):
        refs = {"o1": (book.get(1), 6), "o2": (book.get(4), 9)}
        for rid, (ref, n) in refs.items():
            await w.accept_kv(rid, ref.ks, ref.vs, ref.tokens[0], SamplingParams(max_tokens=n), ref.prompt, "eng")
        solo = book.get(2)
        await hand_off(w, "solo", solo, max_tokens=5)  # no owner: only next_tokens sees it
        got, last, polls = {rid: [] for rid in refs}, {}, 0
        while len(last) < len(refs):
            chunks = await w.next_outputs("eng", timeout=60)
            polls += 1
            assert chunks and {c.request_id for c in chunks} <= set(refs)
            for c in chunks:
                assert c.start_index == len(got[c.request_id])
                got[c.request_id] += c.token_ids
                if c.finished:
                    last[c.request_id] = c
        for rid, (ref, n) in refs.items():
            assert judge(tuple(got[rid]), ref, True, n)[0], (rid, got[rid], ref.tokens)
            assert last[rid].finish_reason is FinishReason.LENGTH
        # both requests step together, so one poll usually carries both: far fewer polls than chunks
        assert polls <= max(n for _, n in refs.values()) + 2
        assert await w.next_outputs("eng", timeout=0.05) == []  # finished streams are gone
        ids, _, end = await drain(w, "solo")
        assert judge(tuple(ids), solo, True, 5)[0] and end.finish_reason is FinishReason.LENGTH

        ref = book.get(6)  # an owned request aborted mid-stream: its last chunk says so, then it is forgotten
        await w.accept_kv("ab", ref.ks, ref.vs, ref.tokens[0], SamplingParams(max_tokens=30), ref.prompt, "eng")
        await w.next_outputs("eng", timeout=60)
        await w.abort("ab")
        end = None
        while end is None:
            end = next((c for c in await w.next_outputs("eng", timeout=60) if c.finished), None)
        assert end.request_id == "ab" and end.finish_reason is FinishReason.ABORT
        with pytest.raises(KeyError, match="unknown or already drained"):
            await w.next_tokens("ab", timeout=1)
        await asyncio.sleep(0.05)
        assert_all_blocks_free(w)
    run(lm, body)


@pytest.mark.parametrize("chunk", [0, 7])  # whole; chunked, but with nothing to step it runs whole
def test_local_prefill_streams_what_a_handoff_would_and_holds_nothing_after(lm, book, chunk):
    async def body(w: DecodeWorker):
        ref = book.get(3)
        greedy = SamplingParams(max_tokens=10)
        seeded = SamplingParams(max_tokens=10, temperature=0.9, seed=11)
        got = await w.prefill_local("local", ref.prompt, greedy)
        assert got.ran and got.first_token == ref.tokens[0] and got.prefill_ms > 0
        ids, _, last = await drain(w, "local")
        ok, _ = judge(tuple(ids), ref, True, 10)
        assert ok and last.finish_reason is FinishReason.LENGTH
        await w.prefill_local("seeded", ref.prompt, seeded)
        ids, _, _ = await drain(w, "seeded")
        assert ids == [t.token_id for t in generate(lm.model, lm.tokenizer, ref.prompt, seeded)]  # first included
        load = await w.load()
        ran = [n for n, _ in load.local_prefills]
        assert ran == [len(ref.prompt)] * 2 if not chunk else sum(ran) == 2 * len(ref.prompt)
        assert_all_blocks_free(w)
    run(lm, body, local_chunk_tokens=chunk)


def test_a_chunked_local_prefill_rides_the_steps_and_streams_exact_tokens(lm, book):
    """With a sequence decoding, the local prompt rides its steps 5 tokens a step: both stream what
    in-process generation gives, and the steps report the chunks they carried."""
    async def body(w: DecodeWorker):
        running, local = book.get(2), book.get(4)
        first = await started(w, "running", running, max_tokens=40)
        steps_before = w.steps
        got = await w.prefill_local("local", local.prompt, SamplingParams(max_tokens=10))
        assert got.ran and got.first_token == local.tokens[0]
        assert w.steps - steps_before >= len(local.prompt) // 5  # a step between any two chunks
        ids, _, _ = await drain(w, "local")
        assert judge(tuple(ids), local, True, 10)[0]
        ids, _, _ = await drain(w, "running", start=len(first.token_ids))
        assert judge(tuple(first.token_ids) + tuple(ids), running, True, 40)[0]
        load = await w.load()
        chunks = [s.chunk_tokens for s in load.steps if s.chunk_tokens]
        assert chunks == [5] * (len(local.prompt) // 5) + [len(local.prompt) % 5] and not load.local_prefills
        assert_all_blocks_free(w)
    run(lm, body, local_chunk_tokens=5)


def test_an_abort_between_chunks_frees_the_local_prefill(lm, book):
    async def body(w: DecodeWorker):
        running, local = book.get(2), book.get(5)
        await started(w, "running", running, max_tokens=60)
        pending = asyncio.ensure_future(w.prefill_local("local", local.prompt, SamplingParams(max_tokens=4)))
        for _ in range(2000):  # until a step carried one of its chunks (bounded: 10 s)
            if any(s.chunk_tokens for s in (await w.load()).steps):
                break
            await asyncio.sleep(0.005)
        else:
            raise AssertionError("no chunk rode a step")
        await w.abort("local")
        assert not (await pending).ran
        await w.abort("running")
        await asyncio.sleep(0.05)
        assert_all_blocks_free(w)
    run(lm, body, local_chunk_tokens=3)


def test_local_chunk_tokens_must_be_a_count(lm):
    with pytest.raises(ValueError, match="local_chunk_tokens"):
        worker(lm, local_chunk_tokens=-1)


@pytest.mark.parametrize("chunk", [0, 7])
def test_local_prefill_refuses_bad_input_and_no_room_and_an_abort_frees_it(lm, book, chunk):
    async def body(w: DecodeWorker):
        ref = book.get(1)
        params = SamplingParams(max_tokens=4)
        with pytest.raises(ValueError, match="prompt_ids"):
            await w.prefill_local("empty", [], params)
        with pytest.raises(ValueError, match="prompt_ids"):
            await w.prefill_local("vocab", [lm.model.cfg.vocab_size], params)
        with pytest.raises(KVRefused, match="capacity"):
            await w.prefill_local("big", ref.prompt, SamplingParams(max_tokens=4000))
        await w.abort("early")  # the abort overtakes the call: it does not run, holds nothing
        assert not (await w.prefill_local("early", ref.prompt, params)).ran
        pending = asyncio.ensure_future(w.prefill_local("queued", ref.prompt, params))
        await asyncio.sleep(0)
        await w.abort("queued")
        assert not (await pending).ran
        assert_all_blocks_free(w)
        _, _, last = await drain(w, "queued")
        assert last.finish_reason is FinishReason.ABORT
    run(lm, body, local_chunk_tokens=chunk)


def test_a_request_continued_after_its_first_tokens_streams_what_the_uninterrupted_run_would(lm, book):
    """A migration's second half: prompt + the k tokens already streamed are prefilled again, and the stream
    goes on at index k with the same tokens (greedy and seeded) and the same text."""
    ref = book.get(7)
    for params in (SamplingParams(max_tokens=12, ignore_eos=True),
                   SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=5, ignore_eos=True)):
        whole = [t.token_id for t in generate(lm.model, lm.tokenizer, ref.prompt, params)]
        k = 5
        context = ref.prompt + whole[:k]
        logits, ks, vs = lm.model.prefill(context)
        first = sample_one(logits, params, make_rng(params, k))  # what the re-prefill samples

        async def body(w: DecodeWorker):
            w.kv_sink.load_sequence("m", ks, vs)
            await w.submit("m", first, params, context, generated=whole[:k])
            ids, text, last = await drain(w, "m", start=k)
            assert ids == whole[k:] and last.finish_reason is FinishReason.LENGTH
            assert lm.tokenizer.decode(whole[:k]) + text == lm.tokenizer.decode(whole)
            with pytest.raises(ValueError, match="generated"):
                await w.submit("n", first, params, context, generated=whole)  # nothing left to generate
            assert_all_blocks_free(w)
        run(lm, body)


def test_the_last_chunk_carries_the_time_from_its_first_steps_start_to_its_last_steps_end(lm, book):
    async def body(w: DecodeWorker):
        ref = book.get(2)
        t0 = time.perf_counter()
        await hand_off(w, "one", ref, max_tokens=1)  # its one token came from prefill: it rides no step
        _, _, last = await drain(w, "one")
        assert last.finished and last.stepping_s == 0.0
        await w.load()  # forget the steps so far
        await hand_off(w, "r", ref, max_tokens=8)
        ids, _, last = await drain(w, "r")
        wall = time.perf_counter() - t0
        steps = (await w.load()).steps
        for _ in range(100):  # its last step's record lands just after its last chunk (bounded)
            if len(steps) == 7:
                break
            await asyncio.sleep(0.01)
            steps += (await w.load()).steps
        assert len(ids) == 8 and [s.batch for s in steps] == [1] * 7  # it rode 7 steps, alone
        # from its first step's start to its last's compute: every step but the last whole, and no more
        # than the wall time around it
        assert sum(s.seconds for s in steps[:-1]) < last.stepping_s <= wall
    run(lm, body)
