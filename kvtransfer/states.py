"""Transfer states and results: data handed between threads, never exceptions."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class TransferState(enum.Enum):
    PENDING = "pending"            # opened, the receiver has not accepted yet
    TRANSFERRING = "transferring"  # the receiver accepted the open; chunks are flowing
    COMMITTED = "committed"        # the receiver's sink committed every layer
    CLAIMED = "claimed"            # receiving side only: the sink's consumer took the committed KV over
    ABORTED = "aborted"            # the sender aborted; both sides released everything
    FAILED = "failed"              # refused, corrupted, timed out or disconnected; both sides released

    @property
    def terminal(self) -> bool:
        return self in (TransferState.COMMITTED, TransferState.CLAIMED, TransferState.ABORTED, TransferState.FAILED)


@dataclass(frozen=True, slots=True)
class TransferResult:
    """Outcome of one transfer as the sender saw it. error_code is a gRPC status code name."""

    request_id: str
    state: TransferState
    error_code: str | None = None
    error: str = ""
    payload_bytes: int = 0      # K/V bytes handed to the transport
    chunks: int = 0
    elapsed_ms: float = 0.0     # open() to the terminal state
    commit_wait_ms: float = 0.0  # commit() call to the receiver's acknowledgement
    max_in_flight: int = 0      # most unacknowledged frames ever in flight (<= window)

    @property
    def ok(self) -> bool:
        return self.state is TransferState.COMMITTED


class TransportError(Exception):
    """Raised by a backend's reply iterator (only inside the sender's reader thread) when the call ends badly."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
