"""How a request ends, in one vocabulary for every layer: the finish reason and a typed failure.

Pure (no numpy): decode, prefill, the engine and the client library all import it.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class FinishReason(enum.Enum):
    """Why a request stopped generating. `.value` is the name the wire and the logs use."""

    STOP = "stop"  # an end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens generated
    ABORT = "abort"  # the client went away or asked to abort
    ERROR = "error"  # ended by a Failure, which travels with it


# gRPC status code names a Failure may carry (grpc.StatusCode without OK)
CODES = frozenset({
    "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
})


@dataclass(frozen=True, slots=True)
class Failure:
    """A per-request error: `code` is a gRPC status code name (one of CODES), `message` says why."""

    code: str
    message: str

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"code: {self.code!r} is not a gRPC status code name (one of {sorted(CODES)})")

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
