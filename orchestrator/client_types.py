"""Typed errors and results of the client library, and their conversion from the wire messages."""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from protos.disagg.v1 import inference_pb2 as pb

# ---------------------------------------------------------------------------------- errors


class ClientError(Exception):
    """A failed call: `code` is the grpc.StatusCode, `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


class InvalidArgument(ClientError): ...
class OutOfRange(ClientError): ...
class NotFound(ClientError): ...
class AlreadyExists(ClientError): ...
class ResourceExhausted(ClientError): ...
class Unavailable(ClientError): ...
class DeadlineExceeded(ClientError): ...
class Unauthenticated(ClientError): ...
class PermissionDenied(ClientError): ...
class Cancelled(ClientError): ...
class Internal(ClientError): ...


_ERRORS: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument, grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.NOT_FOUND: NotFound, grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted, grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded, grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied, grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.INTERNAL: Internal,
}


def error_for(code: grpc.StatusCode | str, message: str) -> ClientError:
    """The typed exception for a status code (or its name, as sent in a stream's Error message)."""
    if isinstance(code, str):
        code = grpc.StatusCode.__members__.get(code, grpc.StatusCode.UNKNOWN)
    return _ERRORS.get(code, ClientError)(code, message)


def _from_rpc(e: grpc.RpcError) -> ClientError:
    return error_for(e.code(), e.details() or "")

# ---------------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Chunk:
    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Timings:
    """Milliseconds spent in each phase of a request: the engine fills it, the client receives it."""

    queued_ms: float
    prefill_ms: float
    transfer_ms: float
    ttft_ms: float
    mean_tpot_ms: float
    e2e_ms: float


@dataclass(frozen=True, slots=True)
class Final:
    request_id: str
    finish_reason: str  # "stop", "length" or "abort"
    usage: Usage
    timings: Timings
    prefill_worker: str
    decode_worker: str


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    final: Final


@dataclass(frozen=True, slots=True)
class SLAClass:
    name: str
    ttft_ms: float
    tpot_ms: float


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    n_layers: int
    context_length: int
    vocab_size: int
    max_tokens_limit: int
    sla_classes: tuple[SLAClass, ...]


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    worker_id: str
    kind: str  # "prefill" or "decode"
    hardware: str
    load: float
    active_requests: int
    queued_requests: int
    kv_blocks_free: int
    kv_blocks_total: int
    healthy: bool


@dataclass(frozen=True, slots=True)
class PoolInfo:
    name: str
    kind: str
    hardware: str
    workers: tuple[WorkerInfo, ...]


@dataclass(frozen=True, slots=True)
class ServerInfo:
    version: str
    model: str
    pools: tuple[PoolInfo, ...]


def _kind(value: int) -> str:
    return pb.WorkerKind.Name(value).removeprefix("WORKER_KIND_").lower()


def _final(request_id: str, f: pb.Final) -> Final:
    t = f.timings
    return Final(request_id, pb.FinishReason.Name(f.finish_reason).removeprefix("FINISH_REASON_").lower(),
                 Usage(f.usage.prompt_tokens, f.usage.completion_tokens),
                 Timings(t.queued_ms, t.prefill_ms, t.transfer_ms, t.ttft_ms, t.mean_tpot_ms, t.e2e_ms),
                 f.prefill_worker, f.decode_worker)


def _model_info(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(m.name, m.n_layers, m.context_length, m.vocab_size, m.max_tokens_limit,
                     tuple(SLAClass(c.name, c.ttft_ms, c.tpot_ms) for c in m.sla_classes))


def _server_info(s: pb.ServerInfo) -> ServerInfo:
    def worker(w: pb.WorkerInfo) -> WorkerInfo:
        return WorkerInfo(w.worker_id, _kind(w.kind), w.hardware, w.load, w.active_requests, w.queued_requests,
                          w.kv_blocks_free, w.kv_blocks_total, w.healthy)

    return ServerInfo(s.version, s.model, tuple(PoolInfo(p.name, _kind(p.kind), p.hardware,
                                                         tuple(worker(w) for w in p.workers)) for p in s.pools))
