"""Contracts between stages: the request, its state machine and placements (timings: client_types)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from model.sampling import SamplingParams
from orchestrator.core.sla import SLATarget


class RequestState(enum.Enum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    TRANSFERRING = "transferring"
    DECODING = "decoding"
    FINISHED = "finished"
    ABORTED = "aborted"


_NEXT = {
    RequestState.QUEUED: {RequestState.PREFILLING, RequestState.ABORTED},
    RequestState.PREFILLING: {RequestState.TRANSFERRING, RequestState.FINISHED, RequestState.ABORTED},
    RequestState.TRANSFERRING: {RequestState.DECODING, RequestState.FINISHED, RequestState.ABORTED},
    RequestState.DECODING: {RequestState.FINISHED, RequestState.ABORTED},
    RequestState.FINISHED: set(),
    RequestState.ABORTED: set(),
}


class FinishReason(enum.Enum):
    STOP = "stop"  # an end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # the client went away or asked to abort
    REJECTED = "rejected"  # the router found no placement that meets the SLA
    ERROR = "error"


@dataclass(slots=True)
class Request:
    """One generation request as the orchestrator tracks it."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    sla: SLATarget
    arrival_s: float
    state: RequestState = RequestState.QUEUED
    finish_reason: FinishReason | None = None
    history: list[tuple[RequestState, float]] = field(default_factory=list)

    def advance(self, new: RequestState, now: float) -> None:
        assert new in _NEXT[self.state], f"{self.request_id}: illegal transition {self.state} -> {new}"
        self.state = new
        self.history.append((new, now))

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)
