"""Credentials of the deployment's two gRPC doors: the frontend's API key and the KV path's token.

Frontend: with an API key (`serve` reads it from PDORCH_API_KEY; programs pass `api_key` to Deployment),
every call to a protected service must carry `authorization: Bearer <key>` metadata (what the client
library sends with `token=`); anything else ends with UNAUTHENTICATED before the call's handler runs.
Health checks and reflection stay open, as load balancers and tools call them without credentials; so
do the KServe door's health calls (ServerLive, ServerReady, ModelReady: Triton's "health" category),
which Kubernetes probes make without credentials.

KV path: `kv_security(cfg)` resolves the transfer token every decode worker's KV receiver demands
(PDORCH_KV_TOKEN, else metadata.kv_transfer.token, else generated) and its optional TLS files; the
pools hand the result to the workers when they build them. TLS on both doors goes through
`server_credentials`. No token or key is ever logged or put in a message.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, replace
from typing import Callable

import grpc
import structlog

from kvtransfer.bearer import refusal
from orchestrator.core.config import Config, MIN_TOKEN_CHARS

API_KEY_ENV = "PDORCH_API_KEY"
KV_TOKEN_ENV = "PDORCH_KV_TOKEN"

log = structlog.get_logger("auth")


def api_key_from_env() -> str | None:
    """The key in PDORCH_API_KEY, None when unset or empty."""
    return os.environ.get(API_KEY_ENV) or None


def server_credentials(cert_pem: bytes, key_pem: bytes) -> grpc.ServerCredentials:
    """TLS for a gRPC server from a PEM certificate chain and its private key."""
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])


@dataclass(frozen=True)
class KVSecurity:
    """What both ends of the KV path need, picklable for Ray: the transfer token and, with TLS, the PEM
    certificate chain (decode workers serve it, prefill workers trust it) and key (decode workers only)."""

    token: str = field(repr=False)
    cert_pem: bytes | None = field(default=None, repr=False)
    key_pem: bytes | None = field(default=None, repr=False)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        assert self.cert_pem is None or self.key_pem is not None, "a sender's KVSecurity cannot serve TLS"
        return None if self.cert_pem is None else server_credentials(self.cert_pem, self.key_pem)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        return None if self.cert_pem is None else grpc.ssl_channel_credentials(self.cert_pem)

    def for_senders(self) -> "KVSecurity":
        """The same without the private key, for prefill workers."""
        return replace(self, key_pem=None)


def kv_security(cfg: Config) -> KVSecurity:
    """The deployment's KV credentials: the token from PDORCH_KV_TOKEN, else metadata.kv_transfer.token,
    else a fresh one (secrets.token_urlsafe); TLS from metadata.kv_transfer.tls_cert_file/tls_key_file."""
    env = os.environ.get(KV_TOKEN_ENV) or None
    if env is not None and len(env) < MIN_TOKEN_CHARS:
        raise ValueError(f"{KV_TOKEN_ENV}: must be at least {MIN_TOKEN_CHARS} characters (its value is not shown)")
    if env is not None:
        token, source = env, KV_TOKEN_ENV
    elif cfg.kv_transfer.token is not None:
        token, source = cfg.kv_transfer.token, "metadata.kv_transfer.token"
    else:
        token, source = secrets.token_urlsafe(32), "generated"
    log.info("kv transfer token", source=source, tls=cfg.kv_transfer.tls is not None)
    if cfg.kv_transfer.tls is None:
        return KVSecurity(token)
    cert, key = cfg.kv_transfer.tls
    return KVSecurity(token, cert.read_bytes(), key.read_bytes())


class BearerAuth(grpc.aio.ServerInterceptor):
    """Refuses calls to `services` without the right bearer token, except the full method names in
    `open_methods` ("/service/Method"); `on_refused(code)` is told of each refusal."""

    def __init__(self, api_key: str, services: tuple[str, ...], on_refused: Callable[[str], None] | None = None,
                 open_methods: frozenset[str] = frozenset()):
        if not api_key:
            raise ValueError("api_key: must not be empty")
        self._api_key = api_key
        self._prefixes = tuple(f"/{s}/" for s in services)
        self._open = open_methods
        self._on_refused = on_refused

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefixes) or details.method in self._open:
            return handler
        reason = refusal(details.invocation_metadata, self._api_key)
        if reason is None:
            return handler
        if self._on_refused is not None:
            self._on_refused(grpc.StatusCode.UNAUTHENTICATED.name)
        return _refusal(handler, f"authorization: {reason}")


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
