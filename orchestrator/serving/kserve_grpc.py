"""The KServe v2 / Triton gRPC door (service inference.GRPCInferenceService) on the frontend's gRPC port.

Health, metadata, config (a decoupled model: any number of responses per request) and statistics
describe the one served model; ModelInfer answers once, ModelStreamInfer streams token chunks, each
response flagged `triton_final_response` (true on the last). Requests are translated by
kserve_request.py and admitted like any gRPC API call (InferenceService.admitted), so validation,
limits, draining, metrics and abort on cancel are the same. Refusals of unary calls are gRPC statuses;
in a stream, a request's refusal is its `error_message` (Triton's convention) and the stream goes on.
"""
from __future__ import annotations

import asyncio

import grpc
import structlog

from orchestrator.serving.engine import ErrorEvent, FinalEvent, TokenEvent
from orchestrator.serving.kserve_request import INPUTS, OUTPUT, encode_bytes_tensor, infer_request
from orchestrator.serving.validation import RequestInvalid
from protos.kserve.v2 import grpc_service_pb2 as kpb
from protos.kserve.v2 import model_config_pb2 as mpb

log = structlog.get_logger("kserve")

KSERVE_SERVICE = "inference.GRPCInferenceService"
# what probes call without credentials (Triton's "health" protocol category): open under an API key
KSERVE_HEALTH_METHODS = frozenset(f"/{KSERVE_SERVICE}/{m}" for m in ("ServerLive", "ServerReady", "ModelReady"))
VERSION = "1"
_CONFIG_TYPES = {"BYTES": mpb.TYPE_STRING, "INT32": mpb.TYPE_INT32, "BOOL": mpb.TYPE_BOOL}


class KServeService:
    """The door's RPCs; `service` is the frontend's InferenceService."""

    def __init__(self, service, version: str):
        self.service, self.version = service, version

    @property
    def model(self) -> str:
        return self.service.cfg.model_name

    def _ready(self) -> bool:
        e = self.service.engine
        healthy = [w for w in (*e.workers.prefill_loads, *e.workers.decode_loads) if w not in e.workers.unhealthy]
        return not self.service.draining and any(w in e.workers.decode_loads for w in healthy)

    async def _known(self, name: str, version: str, context) -> None:
        if name != self.model:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"name: unknown model {name!r}; this server serves "
                                                           f"{self.model!r}")
        if version not in ("", VERSION):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"version: {version!r} unknown; served: {VERSION!r}")

    async def server_live(self, msg, context):
        return kpb.ServerLiveResponse(live=True)

    async def server_ready(self, msg, context):
        return kpb.ServerReadyResponse(ready=self._ready())

    async def model_ready(self, msg, context):
        return kpb.ModelReadyResponse(ready=msg.name == self.model and msg.version in ("", VERSION) and self._ready())

    async def server_metadata(self, msg, context):
        return kpb.ServerMetadataResponse(name="pdorchestrator", version=self.version, extensions=["parameters"])

    async def model_metadata(self, msg, context):
        await self._known(msg.name, msg.version, context)
        tensor = kpb.ModelMetadataResponse.TensorMetadata
        return kpb.ModelMetadataResponse(
            name=self.model, versions=[VERSION], platform="pdorchestrator",
            inputs=[tensor(name=n, datatype=t, shape=[1]) for n, t in INPUTS.items()],
            outputs=[tensor(name=OUTPUT, datatype="BYTES", shape=[-1])])

    async def model_config(self, msg, context):
        await self._known(msg.name, msg.version, context)
        return kpb.ModelConfigResponse(config=mpb.ModelConfig(
            name=self.model, platform="pdorchestrator", backend="pdorchestrator", max_batch_size=0,
            input=[mpb.ModelInput(name=n, data_type=_CONFIG_TYPES[t], dims=[1], optional=n != "text_input")
                   for n, t in INPUTS.items()],
            output=[mpb.ModelOutput(name=OUTPUT, data_type=mpb.TYPE_STRING, dims=[-1])],
            model_transaction_policy=mpb.ModelTransactionPolicy(decoupled=True)))

    async def model_statistics(self, msg, context):
        """Every door's requests, from the frontend's Prometheus counters."""
        if msg.name:
            await self._known(msg.name, msg.version, context)
        value = self.service.metrics.registry.get_sample_value
        ok = int(value("pdorch_e2e_request_latency_seconds_count") or 0)
        ok_ns = int((value("pdorch_e2e_request_latency_seconds_sum") or 0) * 1e9)
        queue = int(value("pdorch_request_queue_time_seconds_count") or 0)
        queue_ns = int((value("pdorch_request_queue_time_seconds_sum") or 0) * 1e9)
        failed = sum(s.value for m in self.service.metrics.failed.collect() for s in m.samples
                     if s.name.endswith("_total"))
        d = kpb.StatisticDuration
        return kpb.ModelStatisticsResponse(model_stats=[kpb.ModelStatistics(
            name=self.model, version=VERSION, inference_count=ok, execution_count=ok,
            last_inference=int((value("pdorch_last_request_finished_timestamp_seconds") or 0) * 1e3),
            inference_stats=kpb.InferStatistics(success=d(count=ok, ns=ok_ns), fail=d(count=int(failed)),
                                                queue=d(count=queue, ns=queue_ns),
                                                compute_infer=d(count=ok, ns=max(0, ok_ns - queue_ns))))])

    # -- inference --------------------------------------------------------------------------

    def _response(self, req: kpb.ModelInferRequest, text: str | None, final: bool, ev=None) -> kpb.ModelInferResponse:
        out = kpb.ModelInferResponse(model_name=self.model, model_version=VERSION, id=req.id)
        if text is not None:
            out.outputs.add(name=OUTPUT, datatype="BYTES", shape=[1])
            out.raw_output_contents.append(encode_bytes_tensor([text.encode()]))
        out.parameters["triton_final_response"].bool_param = final
        if isinstance(ev, FinalEvent):
            out.parameters["finish_reason"].string_param = ev.finish_reason.value
            out.parameters["prompt_tokens"].int64_param = ev.prompt_tokens
            out.parameters["completion_tokens"].int64_param = ev.completion_tokens
        return out

    async def _responses(self, req: kpb.ModelInferRequest, streaming_call: bool):
        """The responses to one request; RequestInvalid before the first if it is refused."""
        t = infer_request(req, streaming_call)
        async with self.service.admitted(t.msg) as (_, events):
            text = []
            async for ev in events:
                if isinstance(ev, ErrorEvent):
                    raise RequestInvalid(grpc.StatusCode[ev.failure.code], ev.failure.message)
                if isinstance(ev, TokenEvent):
                    if t.stream:
                        yield self._response(req, ev.text, False)
                    else:
                        text.append(ev.text)
                    continue
                assert isinstance(ev, FinalEvent)
                if not t.stream:
                    yield self._response(req, "".join(text), True, ev)
                elif t.empty_final:
                    yield self._response(req, None, True, ev)
                else:
                    yield self._response(req, "", True, ev)

    async def model_infer(self, req, context):
        try:
            async for resp in self._responses(req, streaming_call=False):
                return resp
        except RequestInvalid as e:
            await context.abort(e.code, str(e))

    async def model_stream_infer(self, requests, context):
        """Each request of the stream runs on its own; their responses interleave, told apart by id."""
        out: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def one(req):
            try:
                async for resp in self._responses(req, streaming_call=True):
                    await out.put(kpb.ModelStreamInferResponse(infer_response=resp))
            except RequestInvalid as e:
                await out.put(kpb.ModelStreamInferResponse(error_message=f"{e.code.name}: {e}",
                                                           infer_response=kpb.ModelInferResponse(id=req.id)))

        async def read():
            async for raw in requests:
                try:
                    req = kpb.ModelInferRequest.FromString(raw)
                except Exception as e:  # noqa: BLE001 - a DecodeError of one message: tell the client in-stream
                    await out.put(kpb.ModelStreamInferResponse(error_message=f"INVALID_ARGUMENT: request: not a "
                                                               f"valid ModelInferRequest: {e}"))
                    continue
                task = asyncio.create_task(one(req))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
            await out.put(None)

        reader = asyncio.create_task(read())
        try:
            while (resp := await out.get()) is not None:
                yield resp
        finally:  # the call ended (or was cancelled): requests still running are aborted
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(reader, *list(tasks), return_exceptions=True)

    def handler(self, unary) -> grpc.GenericRpcHandler:
        """The service's methods; `unary(request_type, method, response_type)` is the frontend's parser."""
        return grpc.method_handlers_generic_handler(KSERVE_SERVICE, {
            "ServerLive": unary(kpb.ServerLiveRequest, self.server_live, kpb.ServerLiveResponse),
            "ServerReady": unary(kpb.ServerReadyRequest, self.server_ready, kpb.ServerReadyResponse),
            "ModelReady": unary(kpb.ModelReadyRequest, self.model_ready, kpb.ModelReadyResponse),
            "ServerMetadata": unary(kpb.ServerMetadataRequest, self.server_metadata, kpb.ServerMetadataResponse),
            "ModelMetadata": unary(kpb.ModelMetadataRequest, self.model_metadata, kpb.ModelMetadataResponse),
            "ModelConfig": unary(kpb.ModelConfigRequest, self.model_config, kpb.ModelConfigResponse),
            "ModelStatistics": unary(kpb.ModelStatisticsRequest, self.model_statistics, kpb.ModelStatisticsResponse),
            "ModelInfer": unary(kpb.ModelInferRequest, self.model_infer, kpb.ModelInferResponse),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self.model_stream_infer, request_deserializer=None,
                response_serializer=kpb.ModelStreamInferResponse.SerializeToString),
        })
