"""A small fake Inference servicer on a real gRPC server (127.0.0.1, port 0), with health checking."""
from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos.disagg.v1 import inference_pb2 as pb
from protos.disagg.v1 import inference_pb2_grpc as pb_grpc


class FakeInference(pb_grpc.InferenceServicer):
    """Echoes the prompt one character per token. Prompts starting with "status:CODE" fail the RPC with
    CODE; "stream-error:CODE[:REASON]" sends one chunk then an Error message (with the rejection kind
    REASON); "slow" streams until cancelled."""

    def __init__(self):
        self.requests: list[pb.GenerateRequest] = []
        self.metadata: list[dict] = []
        self.cancelled = threading.Event()
        self.running: set[str] = set()

    def Generate(self, request, context):
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        text = request.text or "".join(m.content for m in request.chat.messages) or \
            "".join(chr(97 + i % 26) for i in request.token_ids.ids)
        if text.startswith("status:"):
            context.abort(grpc.StatusCode[text.split(":")[1]], f"sampling.max_tokens: bad ({text})")
        if text.startswith("stream-error:"):
            yield pb.GenerateResponse(request_id=request.request_id, chunk=pb.TokenChunk(token_ids=[1], text="x"))
            code, _, reason = text.split(":", 1)[1].partition(":")
            yield pb.GenerateResponse(request_id=request.request_id,
                                      error=pb.Error(code=code, message="decode worker lost", reason=reason))
            return
        if text == "slow":
            self.running.add(request.request_id)
            context.add_callback(self.cancelled.set)
            sent = 0
            while context.is_active():
                yield pb.GenerateResponse(request_id=request.request_id,
                                          chunk=pb.TokenChunk(token_ids=[0], text=".", index=sent))
                sent += 1
                self.cancelled.wait(0.02)
            return
        if text == "gap":  # a server that lost a token: the client must notice
            for index in (0, 2):
                yield pb.GenerateResponse(request_id=request.request_id,
                                          chunk=pb.TokenChunk(token_ids=[index], text="g", index=index))
            return
        limit = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else len(text)
        for i, ch in enumerate(text[:limit]):
            chunk = pb.TokenChunk(token_ids=[ord(ch)], text=ch, index=i)
            yield pb.GenerateResponse(request_id=request.request_id, chunk=chunk)
        reason = pb.FINISH_REASON_LENGTH if limit < len(text) else pb.FINISH_REASON_STOP
        yield pb.GenerateResponse(request_id=request.request_id, final=pb.Final(
            finish_reason=reason, usage=pb.Usage(prompt_tokens=len(text), completion_tokens=min(limit, len(text))),
            timings=pb.Timings(queued_ms=1, prefill_ms=2, transfer_ms=0.5, ttft_ms=4, mean_tpot_ms=0.25, e2e_ms=9),
            prefill_worker="prefill-0", decode_worker="decode-1"))

    def Abort(self, request, context):
        if request.request_id not in self.running:
            context.abort(grpc.StatusCode.NOT_FOUND, f"request_id: {request.request_id} is not running")
        return pb.AbortResponse(aborted=True)

    def GetModelInfo(self, request, context):
        sla = pb.SLAClass(name="interactive", ttft_ms=500, tpot_ms=50)
        return pb.ModelInfo(name="smollm2-135m", n_layers=30, context_length=8192, vocab_size=49152,
                            max_tokens_limit=1024, sla_classes=[sla])

    def GetServerInfo(self, request, context):
        if dict(context.invocation_metadata()).get("authorization") != "Bearer s3cret":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: missing or wrong bearer token")
        w = pb.WorkerInfo(worker_id="decode-0", kind=pb.WORKER_KIND_DECODE, hardware="cs3", load=0.25,
                          active_requests=3, kv_blocks_free=90, kv_blocks_total=100, healthy=True)
        return pb.ServerInfo(version="0.1.0", model="smollm2-135m", pools=[
            pb.PoolInfo(name="decode", kind=pb.WORKER_KIND_DECODE, hardware="cs3", workers=[w])])


@pytest.fixture
def fake_server():
    servicer = FakeInference()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)
