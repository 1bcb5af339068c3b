"""Client library against a fake servicer: streaming, request building, errors, metadata, async."""
from __future__ import annotations

import asyncio
import sys
import time

import grpc
import pytest

from model.finish import FinishReason
from orchestrator import client as cl


def test_generate_streams_chunks_then_final(fake_server):
    target, _ = fake_server
    with cl.Client(target, timeout=5) as c:
        stream = c.generate("hello", max_tokens=3)
        chunks = list(stream)
    assert [ch.text for ch in chunks] == ["h", "e", "l"] and [ch.index for ch in chunks] == [0, 1, 2]
    assert stream.text == "hel" and stream.token_ids == (104, 101, 108)
    f = stream.final
    assert f.finish_reason is FinishReason.LENGTH and f.usage == cl.Usage(5, 3)
    assert f.timings.ttft_ms == 4 and f.timings.mean_tpot_ms == 0.25 and f.timings.transfer_ms == 0.5
    assert (f.prefill_worker, f.decode_worker) == ("prefill-0", "decode-1")
    assert f.request_id == stream.request_id


def test_complete_and_prompt_kinds(fake_server):
    target, servicer = fake_server
    with cl.Client(target, timeout=5) as c:
        done = c.complete(messages=[("system", "ab"), {"role": "user", "content": "cd"}], request_id="req-7")
        assert done.text == "abcd" and done.final.finish_reason is FinishReason.STOP
        assert c.complete(token_ids=[0, 1, 2]).text == "abc"
    chat, ids = servicer.requests
    assert chat.request_id == "req-7" and chat.WhichOneof("prompt") == "chat"
    assert [(m.role, m.content) for m in chat.chat.messages] == [("system", "ab"), ("user", "cd")]
    assert ids.WhichOneof("prompt") == "token_ids" and list(ids.token_ids.ids) == [0, 1, 2]


def test_build_request_optional_fields():
    req = cl.build_request("hi", temperature=0.0, seed=7, stop=["\n"], ttft_ms=200, sla_class="batch", priority=2)
    assert req.sampling.HasField("temperature") and req.sampling.temperature == 0.0
    assert not req.sampling.HasField("top_p") and not req.sampling.HasField("max_tokens")
    assert req.sampling.seed == 7 and list(req.sampling.stop) == ["\n"]
    assert req.sla.HasField("ttft_ms") and not req.sla.HasField("tpot_ms")
    assert (req.sla.sla_class, req.sla.priority) == ("batch", 2) and not req.HasField("model")
    assert len(req.request_id) == 32
    with pytest.raises(ValueError, match="prompt"):
        cl.build_request("a", token_ids=[1])
    with pytest.raises(ValueError, match="prompt"):
        cl.build_request()


@pytest.mark.parametrize("code,exc", [
    ("INVALID_ARGUMENT", cl.InvalidArgument), ("OUT_OF_RANGE", cl.OutOfRange), ("NOT_FOUND", cl.NotFound),
    ("RESOURCE_EXHAUSTED", cl.ResourceExhausted), ("UNAVAILABLE", cl.Unavailable),
    ("DEADLINE_EXCEEDED", cl.DeadlineExceeded), ("UNAUTHENTICATED", cl.Unauthenticated),
    ("DATA_LOSS", cl.ClientError),
])
def test_status_codes_map_to_exceptions(fake_server, code, exc):
    target, _ = fake_server
    with cl.Client(target, timeout=5) as c:
        with pytest.raises(exc) as info:
            list(c.generate(f"status:{code}"))
    assert isinstance(info.value, cl.ClientError)
    assert info.value.code == grpc.StatusCode[code] and "sampling.max_tokens" in info.value.message


def test_error_inside_stream_raises_after_chunks(fake_server):
    target, _ = fake_server
    with cl.Client(target, timeout=5) as c:
        stream = c.generate("stream-error:RESOURCE_EXHAUSTED")
        got = []
        with pytest.raises(cl.ResourceExhausted, match="decode worker lost") as plain:
            for ch in stream:
                got.append(ch.text)
        with pytest.raises(cl.ResourceExhausted) as rejected:
            c.complete("stream-error:RESOURCE_EXHAUSTED:below_floor")
    assert got == ["x"] and stream.final is None
    assert plain.value.reason == "" and rejected.value.reason == "below_floor"


def test_a_chunk_index_gap_is_data_loss_not_a_silent_hole(fake_server):
    target, _ = fake_server
    with cl.Client(target, timeout=5) as c:
        with pytest.raises(cl.ClientError, match="chunk index 2 after 1 tokens") as e:
            list(c.generate("gap"))
    assert e.value.code is grpc.StatusCode.DATA_LOSS


def test_final_decodes_the_prediction_and_none_when_absent():
    from orchestrator.client.wire import final_from_pb
    from protos.disagg.v1 import inference_pb2 as pb

    f = pb.Final(finish_reason=pb.FINISH_REASON_STOP, prediction=pb.Prediction(
        ttft_ms=790, tpot_ms=39.8, ttft_bound_ms=905, tpot_bound_ms=44, quantile=0.9))
    assert final_from_pb("r", f).prediction == cl.Prediction(790, 39.8, 905, 44, 0.9)
    f.ClearField("prediction")
    assert final_from_pb("r", f).prediction is None


def test_unary_calls_and_bearer_token(fake_server):
    target, servicer = fake_server
    with cl.Client(target, token="s3cret", timeout=5) as c:
        info = c.model_info()
        assert info.name == "smollm2-135m" and info.max_tokens_limit == 1024
        assert info.sla_classes == (cl.SLAClass("interactive", 500.0, 50.0),)
        s = c.server_info()
        assert s.pools[0].kind == "decode" and s.pools[0].workers[0].kind == "decode"
        assert s.pools[0].workers[0].kv_blocks_free == 90
        assert c.health() == "SERVING"
        list(c.generate("ok"))
    assert servicer.metadata[-1]["authorization"] == "Bearer s3cret"
    with cl.Client(target, timeout=5) as c:
        with pytest.raises(cl.Unauthenticated, match="authorization"):
            c.server_info()
        with pytest.raises(cl.NotFound, match="request_id"):
            c.abort("nope")
        with pytest.raises(cl.NotFound):
            c.health("no.such.Service")


def test_cancel_reaches_server_and_abort(fake_server):
    target, servicer = fake_server
    with cl.Client(target, timeout=5) as c:
        stream = c.generate("slow", request_id="long-1")
        it = iter(stream)
        assert next(it).text == "."
        assert c.abort("long-1") is True
        stream.cancel()
        with pytest.raises(cl.Cancelled):
            list(it)
    assert servicer.cancelled.wait(2)


def test_deadline_maps_to_deadline_exceeded(fake_server):
    target, _ = fake_server
    with cl.Client(target, timeout=5) as c:
        start = time.monotonic()
        with pytest.raises(cl.DeadlineExceeded):
            list(c.generate("slow", timeout=0.2))
        assert time.monotonic() - start < 2


def test_unreachable_server_is_unavailable():
    with cl.Client("127.0.0.1:1", timeout=2) as c:
        with pytest.raises(cl.Unavailable):
            c.model_info()


def test_async_client(fake_server):
    target, servicer = fake_server

    async def main():
        async with cl.AsyncClient(target, token="s3cret", timeout=5) as c:
            stream = c.generate("abcdef", max_tokens=4)
            texts = [ch.text async for ch in stream]
            assert texts == list("abcd") and stream.final.finish_reason is FinishReason.LENGTH
            done = await c.complete(token_ids=[3, 4])
            assert done.text == "de" and done.final.usage.completion_tokens == 2
            assert (await c.model_info()).n_layers == 30
            assert (await c.server_info()).model == "smollm2-135m"
            assert await c.health() == "SERVING"
            with pytest.raises(cl.OutOfRange):
                await c.complete("status:OUT_OF_RANGE")
            with pytest.raises(cl.Unavailable, match="decode worker lost"):
                await c.complete("stream-error:UNAVAILABLE")
            with pytest.raises(cl.NotFound):
                await c.abort("missing")

    asyncio.run(main())
    assert servicer.metadata[0]["authorization"] == "Bearer s3cret"


def test_client_imports_no_ray():
    import subprocess

    code = "import sys, orchestrator.client; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_stream_timing_over_a_real_stream(fake_server):
    from orchestrator.client.timing import StreamTiming

    target, _ = fake_server
    stamps = []

    async def main():
        async with cl.AsyncClient(target, timeout=5) as c:
            ok = await StreamTiming().consume(c.generate("abcdef", max_tokens=4),
                                              lambda now, n: stamps.append((now, n)))
            failed = StreamTiming()
            with pytest.raises(cl.Unavailable):
                await failed.consume(c.generate("stream-error:UNAVAILABLE"))
            return ok, failed

    ok, failed = asyncio.run(main())
    assert ok.tokens == 4 == sum(n for _, n in stamps) and ok.final.finish_reason is FinishReason.LENGTH
    assert ok.start <= ok.first <= ok.end and ok.first == min(t for t, n in stamps if n)
    assert ok.ttft_s == ok.first - ok.start and ok.tpot_s == (ok.end - ok.first) / 3
    assert ok.e2e_s == ok.end - ok.start
    # a stream that fails keeps what arrived: one token, no end, no TPOT
    assert failed.tokens == 1 and failed.end is None and failed.tpot_s is None and failed.e2e_s is None
    assert failed.ttft_s is not None and failed.final is None


def test_a_response_of_no_known_kind_or_a_stream_without_final_is_a_client_error():
    from orchestrator.client.grpc_client import GenerateStream
    from protos.disagg.v1 import inference_pb2 as pb

    stream = GenerateStream(iter([pb.GenerateResponse(request_id="r")]), "r")
    with pytest.raises(cl.ClientError, match="unknown kind None") as e:
        list(stream)
    assert e.value.code == grpc.StatusCode.INTERNAL
    with pytest.raises(cl.ClientError, match="without a final message"):
        stream.completion()
