"""Contracts between stages: the request, its state machine and SLA target (how it ends: model/finish.py)."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from model.finish import Failure, FinishReason
from model.sampling import SamplingParams
from orchestrator.core.sla import SLATarget


class RequestState(enum.Enum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    TRANSFERRING = "transferring"  # KV committed on the decode side, the request not yet submitted there
    DECODING = "decoding"
    FINISHED = "finished"  # ended by a stop or max_tokens
    ABORTED = "aborted"  # the client went away or asked to abort
    REJECTED = "rejected"  # no placement meets its SLA (ended before any worker saw it)
    FAILED = "failed"  # a worker failed it (its Failure says why)

    @property
    def terminal(self) -> bool:
        return not _NEXT[self]


_ENDS = {RequestState.ABORTED, RequestState.FAILED}
_NEXT = {
    RequestState.QUEUED: {RequestState.PREFILLING, RequestState.REJECTED} | _ENDS,
    # back to PREFILLING: a migration (a worker died under it; it is placed and prefilled again)
    RequestState.PREFILLING: {RequestState.TRANSFERRING, RequestState.PREFILLING} | _ENDS,
    RequestState.TRANSFERRING: {RequestState.DECODING, RequestState.PREFILLING} | _ENDS,
    RequestState.DECODING: {RequestState.FINISHED, RequestState.PREFILLING} | _ENDS,
    RequestState.FINISHED: set(),
    RequestState.ABORTED: set(),
    RequestState.REJECTED: set(),
    RequestState.FAILED: set(),
}
_END_STATE = {FinishReason.STOP: RequestState.FINISHED, FinishReason.LENGTH: RequestState.FINISHED,
              FinishReason.ABORT: RequestState.ABORTED, FinishReason.ERROR: RequestState.FAILED}


@dataclass(slots=True)
class Request:
    """One generation request as the orchestrator tracks it."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    sla: SLATarget
    arrival_s: float
    state: RequestState = RequestState.QUEUED
    finish_reason: FinishReason | None = None  # set by end()
    failure: Failure | None = None  # why it FAILED or was REJECTED

    def advance(self, new: RequestState) -> None:
        """Move to a live state (PREFILLING, TRANSFERRING, DECODING); end() moves to a final one."""
        assert new in _NEXT[self.state] and not new.terminal, f"{self.request_id}: illegal {self.state} -> {new}"
        self.state = new

    def end(self, reason: FinishReason, failure: Failure | None = None, rejected: bool = False) -> None:
        """Record how the request ended: FINISHED, ABORTED, FAILED (with a failure), or REJECTED."""
        assert (reason is FinishReason.ERROR) == (failure is not None), f"{self.request_id}: {reason} with {failure}"
        new = RequestState.REJECTED if rejected else _END_STATE[reason]
        assert new in _NEXT[self.state], f"{self.request_id}: illegal {self.state} -> {new}"
        self.state, self.finish_reason, self.failure = new, reason, failure

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)
