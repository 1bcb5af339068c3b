"""The gRPC frontend (asyncio): validate (orchestrator/serving/validation.py), hand to the Engine, stream
tokens back.

Serves disagg.v1.Inference plus grpc.health.v1 and server reflection, and Prometheus metrics over
HTTP (orchestrator/serving/metrics.py) the OpenAI-compatible HTTP door (orchestrator/serving/openai_http.py) and, on the gRPC port, the KServe v2 door
(orchestrator/serving/kserve_grpc.py); inference calls can require a bearer token
(orchestrator/serving/auth.py). Every method parses its own request bytes, so a malformed request (or a
prompt with invalid UTF-8) gets INVALID_ARGUMENT instead of gRPC's UNKNOWN for a deserializer error.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from model.tokenizer import Tokenizer
from orchestrator.serving.auth import BearerAuth, server_credentials
from orchestrator.core.config import Config
from orchestrator.core.request import Request
from orchestrator.client.wire import FINISH_TO_PB
from orchestrator.serving.engine import Engine, ErrorEvent, FinalEvent, TokenEvent
from orchestrator.serving.kserve_grpc import KSERVE_HEALTH_METHODS, KSERVE_SERVICE, KServeService
from orchestrator.serving.metrics import ServingMetrics, start_metrics_server
from orchestrator.serving.openai_http import start_openai_server
from orchestrator.serving.validation import RequestInvalid, RequestValidator
from protos.disagg.v1 import inference_pb2 as pb

log = structlog.get_logger("frontend")

SERVICE = "disagg.v1.Inference"
VERSION = importlib.metadata.version("pdorchestrator")  # the installed package's, from pyproject.toml


class InferenceService:
    def __init__(self, cfg: Config, engine: Engine, tokenizer: Tokenizer, context_length: int, n_layers: int):
        self.cfg = cfg
        self.engine = engine
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.n_layers = n_layers
        self.validator = RequestValidator(cfg, tokenizer, context_length)
        self._running: set[str] = set()
        self.draining = False  # set by Frontend.stop: new Generate calls get UNAVAILABLE
        self.metrics = ServingMetrics(self.pools)

    # -- RPCs ----------------------------------------------------------------------------

    async def generate(self, raw: bytes, context: grpc.aio.ServicerContext):
        msg = await self._parse(pb.GenerateRequest, raw, context)
        try:
            async with self.admitted(msg) as (req, events):
                async for ev in events:
                    yield self._response(req.request_id, ev)
        except RequestInvalid as e:  # raised by admitted() before the stream starts
            await context.abort(e.code, str(e))

    def admit(self, msg: pb.GenerateRequest) -> Request:
        """The Request `msg` asks for if this server takes it now; RequestInvalid (counted as refused)
        naming the field, or saying why not (draining, a duplicate request_id, the concurrency limit).
        Every door goes through here (and admitted()), so the rules live once."""
        try:
            req = self.validator.build_request(msg)
            if self.draining:
                raise RequestInvalid(grpc.StatusCode.UNAVAILABLE, "server: shutting down; retry on another replica")
            if req.request_id in self._running:
                raise RequestInvalid(grpc.StatusCode.ALREADY_EXISTS,
                                     f"request_id: {req.request_id!r} is already running")
            if len(self._running) >= self.cfg.frontend.max_concurrent_requests:
                raise RequestInvalid(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     f"server: {len(self._running)} requests running, the limit is "
                                     f"{self.cfg.frontend.max_concurrent_requests}")
        except RequestInvalid as e:
            log.info("invalid request", request_id=msg.request_id, code=e.code.name, reason=str(e))
            self.metrics.refused(e.code.name)
            raise
        return req

    @contextlib.asynccontextmanager
    async def admitted(self, msg: pb.GenerateRequest):
        """`async with service.admitted(msg) as (req, events):` admit (RequestInvalid if refused), then
        iterate the engine's events for it, counted in the metrics and the running set. Leaving the
        block early (the client went away) aborts the request on both pools."""
        req = self.admit(msg)
        self._running.add(req.request_id)
        self.metrics.running.inc()
        log.info("accepted", request_id=req.request_id, prompt_tokens=req.prompt_tokens,
                 max_tokens=req.sampling.max_tokens)
        events = self.engine.generate(req)
        ended = False

        async def counted():
            nonlocal ended
            async for ev in events:
                if isinstance(ev, FinalEvent):
                    self.metrics.final(ev, req.sla)
                    ended = True
                elif isinstance(ev, ErrorEvent):
                    self.metrics.error(ev)
                    ended = True
                yield ev

        stream = counted()
        try:
            yield req, stream
        finally:  # on client cancel too: closing the engine's stream aborts the request on both pools
            await stream.aclose()
            await events.aclose()
            self._running.discard(req.request_id)
            self.metrics.running.dec()
            if not ended:
                self.metrics.failed.labels(grpc.StatusCode.CANCELLED.name).inc()

    async def drain(self, timeout_s: float) -> int:
        """Refuse new Generate calls and wait up to timeout_s for the running ones to end;
        returns how many are still running."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return len(self._running)

    async def _parse(self, message_type, raw: bytes, context: grpc.aio.ServicerContext):
        """The request from its bytes, or the call ends with INVALID_ARGUMENT."""
        try:
            return message_type.FromString(raw)
        except DecodeError as e:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid "
                               f"{message_type.DESCRIPTOR.name} (invalid UTF-8 in a string field?): {e}")

    async def _refuse(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        """End the call before its stream starts (context.abort raises)."""
        self.metrics.refused(code.name)
        await context.abort(code, message)

    @staticmethod
    def _response(rid: str, ev) -> pb.GenerateResponse:
        if isinstance(ev, TokenEvent):
            return pb.GenerateResponse(request_id=rid, chunk=pb.TokenChunk(token_ids=ev.token_ids, text=ev.text,
                                                                           index=ev.index))
        if isinstance(ev, ErrorEvent):
            return pb.GenerateResponse(request_id=rid, error=pb.Error(
                code=ev.failure.code, message=ev.failure.message, reason=ev.rejection))
        assert isinstance(ev, FinalEvent)
        t, p = ev.timings, ev.prediction
        prediction = None if p is None else pb.Prediction(
            ttft_ms=p.ttft_ms, tpot_ms=p.tpot_ms, ttft_bound_ms=p.ttft_bound_ms, tpot_bound_ms=p.tpot_bound_ms,
            quantile=p.quantile)
        return pb.GenerateResponse(request_id=rid, final=pb.Final(
            finish_reason=FINISH_TO_PB[ev.finish_reason],
            usage=pb.Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens),
            timings=pb.Timings(queued_ms=t.queued_ms, prefill_ms=t.prefill_ms, transfer_ms=t.transfer_ms,
                               ttft_ms=t.ttft_ms, mean_tpot_ms=t.mean_tpot_ms, e2e_ms=t.e2e_ms),
            prefill_worker=ev.prefill_worker, decode_worker=ev.decode_worker, prediction=prediction,
            migrations=ev.migrations))

    async def abort(self, msg: pb.AbortRequest, context) -> pb.AbortResponse:
        if not msg.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: required")
        if not await self.engine.abort(msg.request_id):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request_id: {msg.request_id!r} is not running")
        return pb.AbortResponse(aborted=True)

    async def model_info(self, msg, context) -> pb.ModelInfo:
        return pb.ModelInfo(
            name=self.cfg.model_name, n_layers=self.n_layers, context_length=self.context_length,
            vocab_size=self.tokenizer.vocab_size, max_tokens_limit=self.cfg.max_tokens_limit,
            sla_classes=[pb.SLAClass(name=n, ttft_ms=s.ttft_ms, tpot_ms=s.tpot_ms)
                         for n, s in self.cfg.sla_classes.items()])

    def pools(self) -> list[pb.PoolInfo]:
        """Both pools' workers as the engine last saw them (GetServerInfo, the metrics' gauges)."""
        hw = self.engine.pools.hardware
        budget = max(self.cfg.prefill.token_budget, 1)
        prefill = pb.PoolInfo(name="prefill", kind=pb.WORKER_KIND_PREFILL, hardware=self.cfg.prefill.hardware, workers=[
            pb.WorkerInfo(worker_id=w, kind=pb.WORKER_KIND_PREFILL, hardware=hw.get(w, ""),
                          load=min(1.0, l.queued_tokens / budget), active_requests=len(l.running),
                          queued_requests=l.waiting, healthy=w not in self.engine.workers.unhealthy)
            for w, l in self.engine.workers.prefill_loads.items()])
        occupancy = {v.worker_id: v.occupancy for v in self.engine.workers.views()[1]}
        decode = pb.PoolInfo(name="decode", kind=pb.WORKER_KIND_DECODE, hardware=self.cfg.decode.hardware, workers=[
            pb.WorkerInfo(worker_id=w, kind=pb.WORKER_KIND_DECODE, hardware=hw.get(w, ""),
                          load=occupancy[w],
                          active_requests=l.active, queued_requests=l.waiting, kv_blocks_free=l.free_blocks,
                          kv_blocks_total=l.total_blocks, healthy=w not in self.engine.workers.unhealthy)
            for w, l in self.engine.workers.decode_loads.items()])
        return [prefill, decode]

    async def server_info(self, msg, context) -> pb.ServerInfo:
        return pb.ServerInfo(version=VERSION, model=self.cfg.model_name, pools=self.pools())

    def _unary(self, request_type, method, response_type) -> grpc.RpcMethodHandler:
        """A unary method that gets the request parsed by _parse (the handler sees raw bytes)."""
        async def call(raw: bytes, context: grpc.aio.ServicerContext):
            return await method(await self._parse(request_type, raw, context), context)

        return grpc.unary_unary_rpc_method_handler(call, response_serializer=response_type.SerializeToString)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.generate, request_deserializer=None, response_serializer=pb.GenerateResponse.SerializeToString),
            "Abort": self._unary(pb.AbortRequest, self.abort, pb.AbortResponse),
            "GetModelInfo": self._unary(pb.GetModelInfoRequest, self.model_info, pb.ModelInfo),
            "GetServerInfo": self._unary(pb.GetServerInfoRequest, self.server_info, pb.ServerInfo),
        })


@dataclass
class Frontend:
    """A started frontend: the gRPC server and, if enabled, the metrics endpoint."""

    server: grpc.aio.Server
    service: InferenceService
    health: health.aio.HealthServicer
    host: str  # the address both endpoints bound
    port: int  # the gRPC port it bound
    metrics_port: int | None  # the HTTP port of /metrics, None when off
    _metrics_runner: object | None = None
    http_port: int | None = None  # the OpenAI-compatible HTTP door's port, None when off
    _http_runner: object | None = None

    @property
    def target(self) -> str:
        """host:port for the client library."""
        return f"{self.host}:{self.port}"

    @property
    def http_url(self) -> str | None:
        """The OpenAI-compatible door's base URL (what the openai client takes as base_url)."""
        return None if self.http_port is None else f"http://{self.host}:{self.http_port}/v1"

    @property
    def metrics_url(self) -> str | None:
        return None if self.metrics_port is None else f"http://{self.host}:{self.metrics_port}/metrics"

    async def stop(self, grace_s: float) -> None:
        """Drain: report NOT_SERVING, answer new Generate calls with UNAVAILABLE, give the streams
        in flight up to grace_s to finish, then stop the server, which cancels the rest (their
        requests are aborted on both pools)."""
        await self.health.enter_graceful_shutdown()
        log.info("frontend draining", grace_s=grace_s)
        left = await self.service.drain(grace_s)
        if left:
            log.warning("cancelling streams still running after the grace period", running=left)
        await self.server.stop(grace=0.5)
        for runner in (self._http_runner, self._metrics_runner):
            if runner is not None:
                await runner.cleanup()


class ListenError(OSError):
    """The frontend cannot listen where it is told to (port in use, unknown address, bad TLS files)."""


def listen(server: grpc.aio.Server, address: str, tls: tuple[Path, Path] | None) -> int:
    """Bind `address` in plaintext, or with TLS from (certificate chain, private key) PEM files;
    returns the port bound. ListenError if it cannot."""
    try:
        if tls is None:
            return server.add_insecure_port(address)
        cert, key = tls
        return server.add_secure_port(address, server_credentials(cert.read_bytes(), key.read_bytes()))
    except RuntimeError:  # gRPC says only "Failed to bind"; its log has the reason
        why = "in use, or not an address of this host?" if tls is None else \
            f"with TLS from {tls[0]} and {tls[1]}: in use, or does the key not match the certificate?"
        raise ListenError(f"frontend.port: cannot listen on {address} ({why})") from None


async def start_frontend(cfg: Config, engine: Engine, tokenizer: Tokenizer, context_length: int, n_layers: int,
                         host: str | None = None, port: int | None = None, metrics_port: int | None = None,
                         api_key: str | None = None, http_port: int | None = None) -> Frontend:
    """Start the frontend on host:port, its metrics on host:metrics_port and the OpenAI-compatible
    door on host:http_port (None: the config's values; port 0 picks a free one). With an api_key,
    inference calls need it as a bearer token (orchestrator/serving/auth.py)."""
    limit = cfg.frontend.max_message_bytes
    service = InferenceService(cfg, engine, tokenizer, context_length, n_layers)
    interceptors = [BearerAuth(api_key, (SERVICE, KSERVE_SERVICE), service.metrics.refused,
                               open_methods=KSERVE_HEALTH_METHODS)] if api_key else []
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", limit)], interceptors=interceptors)
    server.add_generic_rpc_handlers([service.handler(), KServeService(service, VERSION).handler(service._unary)])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [pb.DESCRIPTOR.services_by_name["Inference"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    host = host or cfg.frontend.host
    bound = listen(server, f"{host}:{cfg.frontend.port if port is None else port}", cfg.frontend.tls)
    await server.start()
    await health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("frontend listening", address=f"{host}:{bound}", tls=cfg.frontend.tls is not None,
             auth="bearer token" if api_key else "none")
    metrics_port = cfg.frontend.metrics_port if metrics_port is None else metrics_port
    http_port = cfg.frontend.http_port if http_port is None else http_port
    frontend = Frontend(server, service, health_servicer, host, bound, None)
    try:
        if metrics_port is not None:
            frontend._metrics_runner, frontend.metrics_port = await _start_http(
                "metrics_port", start_metrics_server(service.metrics, host, metrics_port), host, metrics_port)
            log.info("metrics listening", address=frontend.metrics_url)
        if http_port is not None:
            frontend._http_runner, frontend.http_port = await _start_http(
                "http_port", start_openai_server(service, host, http_port, api_key), host, http_port)
            log.info("openai http listening", address=frontend.http_url)
    except BaseException:
        await server.stop(grace=None)
        if frontend._metrics_runner is not None:
            await frontend._metrics_runner.cleanup()
        raise
    return frontend


async def _start_http(key: str, starting, host: str, port: int):
    """(runner, bound port) of an aiohttp endpoint being started, or ListenError naming frontend.<key>."""
    try:
        return await starting
    except OSError as e:
        raise ListenError(f"frontend.{key}: cannot listen on {host}:{port}: {e.strerror or e}") from e
