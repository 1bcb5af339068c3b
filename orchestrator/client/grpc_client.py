"""Client library for the orchestrator's gRPC API (disagg.v1.Inference): sync `Client`, asyncio `AsyncClient`.

    with Client("127.0.0.1:50051") as c:
        stream = c.generate("Hello", max_tokens=32)
        for chunk in stream:
            print(chunk.text, end="")
        print(stream.final.timings.ttft_ms)

Imports no Ray. gRPC status codes, and errors sent inside a Generate stream, raise typed ClientErrors.
"""
from __future__ import annotations

import contextlib
import uuid
from typing import AsyncIterator, Callable, Iterator, Mapping, Sequence

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.client.types import ClientError, Chunk, Completion, Final, error_for
from orchestrator.client.wire import error_from_rpc, final_from_pb, model_info_from_pb, server_info_from_pb
from protos.disagg.v1 import inference_pb2 as pb
from protos.disagg.v1 import inference_pb2_grpc as pb_grpc

# ---------------------------------------------------------------------------------- requests


def build_request(prompt: str | None = None, *, messages: Sequence | None = None,
                  token_ids: Sequence[int] | None = None, max_tokens: int | None = None,
                  temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                  stop: Sequence[str] = (), ignore_eos: bool = False, ttft_ms: float | None = None,
                  tpot_ms: float | None = None, sla_class: str = "", priority: int = 0, request_id: str | None = None,
                  model: str | None = None) -> pb.GenerateRequest:
    """A GenerateRequest from exactly one of prompt (raw text), messages (chat) or token_ids.

    messages: (role, content) pairs, {"role", "content"} dicts or objects with .role and .content.
    None leaves a field unset (the server's default); the server validates values.
    """
    if sum(x is not None for x in (prompt, messages, token_ids)) != 1:
        raise ValueError("prompt: give exactly one of prompt, messages or token_ids")
    req = pb.GenerateRequest(request_id=request_id or uuid.uuid4().hex, sampling=pb.SamplingParams(stop=stop, ignore_eos=ignore_eos),
                             sla=pb.SLA(sla_class=sla_class, priority=priority))
    if prompt is not None:
        req.text = prompt
    elif token_ids is not None:
        req.token_ids.ids.extend(int(t) for t in token_ids)
    else:
        for m in messages:
            role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else \
                (m.role, m.content) if hasattr(m, "role") else m
            req.chat.messages.add(role=role, content=content)
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("seed", seed)):
        if value is not None:
            setattr(req.sampling, name, value)
    for name, value in (("ttft_ms", ttft_ms), ("tpot_ms", tpot_ms)):
        if value is not None:
            setattr(req.sla, name, value)
    if model is not None:
        req.model = model
    return req


def _chunk_or_final(resp: pb.GenerateResponse, request_id: str) -> Chunk | Final:
    kind = resp.WhichOneof("kind")
    if kind == "chunk":
        return Chunk(tuple(resp.chunk.token_ids), resp.chunk.text, resp.chunk.index)
    if kind == "final":
        return final_from_pb(resp.request_id or request_id, resp.final)
    if kind == "error":
        raise error_for(resp.error.code, resp.error.message, resp.error.reason)
    raise ClientError(grpc.StatusCode.INTERNAL, f"response: unknown kind {kind!r}")


class _StreamState:
    """What a stream has produced so far (shared by the sync and async streams)."""

    def __init__(self, call, request_id: str):
        self._call = call
        self.request_id = request_id
        self.final: Final | None = None
        self._texts: list[str] = []
        self._ids: list[int] = []
        self.index_error: tuple[int, int] | None = None  # (tokens received, the chunk's index) at a gap or repeat

    def take(self, resp: pb.GenerateResponse) -> Chunk | None:
        item = _chunk_or_final(resp, self.request_id)
        if isinstance(item, Final):
            self.final = item
            return None
        if item.index != len(self._ids):  # the server streams every token once, in order, migrations included
            self.index_error = (len(self._ids), item.index)
            raise ClientError(grpc.StatusCode.DATA_LOSS, f"chunk index {item.index} after {len(self._ids)} tokens: "
                                                         f"tokens lost or duplicated")
        self._texts.append(item.text)
        self._ids.extend(item.token_ids)
        return item

    @property
    def text(self) -> str:
        return "".join(self._texts)

    @property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(self._ids)

    def completion(self) -> Completion:
        if self.final is None:
            raise ClientError(grpc.StatusCode.UNKNOWN, "stream ended without a final message")
        return Completion(self.text, self.token_ids, self.final)

    def cancel(self) -> None:
        self._call.cancel()


@contextlib.contextmanager
def _typed_errors():
    """A grpc.RpcError raised inside becomes the typed ClientError of its status."""
    try:
        yield
    except grpc.RpcError as e:
        raise error_from_rpc(e) from None


class GenerateStream(_StreamState):
    """Iterate for Chunks; afterwards `.final` holds finish reason, usage and timings. `cancel()` stops it."""

    def __iter__(self) -> Iterator[Chunk]:
        with _typed_errors():
            for resp in self._call:
                if (chunk := self.take(resp)) is not None:
                    yield chunk

    def __enter__(self) -> "GenerateStream":
        return self

    def __exit__(self, *exc) -> None:
        if self.final is None:
            self.cancel()


class AsyncGenerateStream(_StreamState):
    """`async for chunk in stream`; afterwards `.final`. `cancel()` stops it."""

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        with _typed_errors():
            async for resp in self._call:
                if (chunk := self.take(resp)) is not None:
                    yield chunk

# ---------------------------------------------------------------------------------- clients


def _health_status(resp: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


class _Base:
    """The calls of both clients. Each subclass says how a call runs (`_unary`: blocking or awaited)
    and which stream `generate` returns; on AsyncClient every method below returns an awaitable."""

    _aio: bool
    _stream: type[_StreamState]

    def __init__(self, target: str, *, tls: bool = False, root_certificates: bytes | None = None,
                 token: str | None = None, timeout: float | None = None, options: Sequence = ()):
        """`timeout` (seconds) is the default deadline of every call, whole streams included."""
        mod = grpc.aio if self._aio else grpc
        if tls or root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates)
            self._channel = mod.secure_channel(target, creds, options=list(options))
        else:
            self._channel = mod.insecure_channel(target, options=list(options))
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _kw(self, timeout: float | None) -> dict:
        return dict(timeout=timeout if timeout is not None else self._timeout, metadata=self._metadata)

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kw):
        """Start a generation (arguments as build_request); iterate the returned stream for chunks."""
        req = build_request(prompt, **kw)
        return self._stream(self._stub.Generate(req, **self._kw(timeout)), req.request_id)

    def abort(self, request_id: str, *, timeout: float | None = None):
        """True if the server knew the request and aborted it."""
        return self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id), timeout, lambda r: r.aborted)

    def model_info(self, *, timeout: float | None = None):
        """The served model and its SLA classes (ModelInfo)."""
        return self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout, model_info_from_pb)

    def server_info(self, *, timeout: float | None = None):
        """The pools and every worker's health and load (ServerInfo)."""
        return self._unary(self._stub.GetServerInfo, pb.GetServerInfoRequest(), timeout, server_info_from_pb)

    def health(self, service: str = "", *, timeout: float | None = None):
        """grpc.health.v1 status name: "SERVING", "NOT_SERVING", ..."""
        return self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout, _health_status)

    def _unary(self, method, request, timeout: float | None, convert: Callable):
        raise NotImplementedError


class Client(_Base):
    """Blocking client: every call returns its result."""

    _aio, _stream = False, GenerateStream

    def complete(self, prompt: str | None = None, **kw) -> Completion:
        """Generate to the end (arguments as build_request); the whole text, ids and final."""
        stream = self.generate(prompt, **kw)
        for _ in stream:
            pass
        return stream.completion()

    def _unary(self, method, request, timeout: float | None, convert: Callable):
        with _typed_errors():
            return convert(method(request, **self._kw(timeout)))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client with the same methods as Client: coroutines, and generate returns an async stream."""

    _aio, _stream = True, AsyncGenerateStream

    async def complete(self, prompt: str | None = None, **kw) -> Completion:
        stream = self.generate(prompt, **kw)
        async for _ in stream:
            pass
        return stream.completion()

    async def _unary(self, method, request, timeout: float | None, convert: Callable):
        with _typed_errors():
            return convert(await method(request, **self._kw(timeout)))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
