"""Bearer-token authentication for the frontend's inference service.

With an API key (`serve` reads it from PDORCH_API_KEY; programs pass `api_key` to Deployment), every
call to a protected service must carry `authorization: Bearer <key>` metadata (what the client library sends
with `token=`); anything else ends with UNAUTHENTICATED before the call's handler runs. Health
checks and reflection stay open, as load balancers and tools call them without credentials.
"""
from __future__ import annotations

import hmac
import os
from typing import Callable

import grpc

API_KEY_ENV = "PDORCH_API_KEY"


def api_key_from_env() -> str | None:
    """The key in PDORCH_API_KEY, None when unset or empty."""
    return os.environ.get(API_KEY_ENV) or None


class BearerAuth(grpc.aio.ServerInterceptor):
    """Refuses calls to `services` without the right bearer token; `on_refused(code)` is told of each."""

    def __init__(self, api_key: str, services: tuple[str, ...], on_refused: Callable[[str], None] | None = None):
        if not api_key:
            raise ValueError("api_key: must not be empty")
        self._expected = f"Bearer {api_key}".encode()
        self._prefixes = tuple(f"/{s}/" for s in services)
        self._on_refused = on_refused

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefixes):
            return handler
        reason = self._check(details.invocation_metadata or ())
        if reason is None:
            return handler
        if self._on_refused is not None:
            self._on_refused(grpc.StatusCode.UNAUTHENTICATED.name)
        return _refusal(handler, f"authorization: {reason}")

    def _check(self, metadata) -> str | None:
        """None if the metadata carries the key, else why not."""
        values = [v for k, v in metadata if k == "authorization"]
        if not values:
            return "missing; send 'authorization: Bearer <key>' metadata (the client's token=)"
        value = values[0].encode() if isinstance(values[0], str) else values[0]
        if not hmac.compare_digest(value, self._expected):  # constant time: no timing hint at the key
            return "invalid bearer token"
        return None


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with UNAUTHENTICATED."""
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # never reached: makes this an async generator, as streaming handlers are

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)
