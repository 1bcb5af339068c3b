"""Typed errors and results of the client library (their conversion from the wire: client/wire.py)."""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from model.finish import FinishReason


# ---------------------------------------------------------------------------------- errors


class ClientError(Exception):
    """A failed call: `code` is the grpc.StatusCode, `message` the server's explanation, `reason` the
    router's rejection kind when it turned the request away ("below_floor", "ttft", ...; else "")."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = ""):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.reason = code, message, reason


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


def error_for(code: grpc.StatusCode | str, message: str, reason: str = "") -> ClientError:
    """The typed exception for a status code (or its name, as sent in a stream's Error message)."""
    if isinstance(code, str):
        code = grpc.StatusCode.__members__.get(code, grpc.StatusCode.UNKNOWN)
    return _ERRORS.get(code, ClientError)(code, message, reason)


# ---------------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Chunk:
    token_ids: tuple[int, ...]
    text: str
    index: int = 0  # of token_ids[0] in the output; the stream checks chunks are contiguous


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
class Prediction:
    """What the router predicted for the request when it placed it (milliseconds): a point estimate
    and a bound at the router's confidence `quantile` (0 when the request was not predicted)."""

    ttft_ms: float
    tpot_ms: float
    ttft_bound_ms: float
    tpot_bound_ms: float
    quantile: float


@dataclass(frozen=True, slots=True)
class Final:
    request_id: str
    finish_reason: FinishReason  # STOP, LENGTH or ABORT (an error arrives as a ClientError instead)
    usage: Usage
    timings: Timings
    prefill_worker: str
    decode_worker: str
    prediction: Prediction | None = None  # the router's prediction, to compare with `timings`
    migrations: int = 0  # times it was placed again because a worker died under it


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    final: Final


@dataclass(frozen=True, slots=True)
class SLAClass:
    """A named SLA class as GetModelInfo reports it: data from the wire (client/wire.py), no rule of its own.
    The server's type, and the rule for "met", are orchestrator/core/sla.py's."""

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
