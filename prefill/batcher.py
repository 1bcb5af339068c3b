"""Groups waiting prompts into prefill batches under a token budget.

Pure policy (no clock, no I/O): the live PrefillWorker and the simulator both drive it.
Order: earliest deadline first (deadline = arrival + the request's TTFT target; no target: +inf,
after every prompt that has one), then higher priority (the tiebreak between equal deadlines, and
the whole order among prompts without targets), then arrival (FCFS). Earliest-deadline-first is the
order that meets every deadline whenever any order can (on one worker, with admission control
turning away what cannot be met); priority alone would let a loose batch request delay a tight
interactive one behind it. A batch takes prompts in that order while
their total stays within `token_budget` and the count within `max_batch`; a prompt longer than
the budget runs alone rather than waiting forever. Skipping ahead is not allowed, so a long
prompt is never starved by a stream of short ones.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PrefillItem:
    request_id: str
    n_tokens: int
    arrival_s: float
    priority: int = 0
    ttft_s: float = math.inf  # seconds, the request's TTFT target


def _order(item: PrefillItem) -> tuple[float, int, float]:
    """The run order (orchestrator/core/queueplan.py's order_key restates it for the predictor)."""
    return (item.arrival_s + item.ttft_s, -item.priority, item.arrival_s)


class PrefillBatcher:
    def __init__(self, token_budget: int, max_batch: int):
        if token_budget < 1:
            raise ValueError(f"token_budget: must be >= 1, got {token_budget}")
        if max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {max_batch}")
        self.token_budget = token_budget
        self.max_batch = max_batch
        self._waiting: list[PrefillItem] = []
        self.queued_tokens = 0

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def waiting(self) -> tuple[PrefillItem, ...]:
        """The waiting prompts in run order."""
        return tuple(self._waiting)

    def add(self, item: PrefillItem) -> None:
        assert item.n_tokens >= 1, "a prompt has at least one token"
        # after equal keys, so equal priority and arrival stay first come, first served
        bisect.insort_right(self._waiting, item, key=_order)
        self.queued_tokens += item.n_tokens

    def remove(self, request_id: str) -> bool:
        """Drop a waiting prompt (abort); False if it is not waiting."""
        for i, it in enumerate(self._waiting):
            if it.request_id == request_id:
                del self._waiting[i]
                self.queued_tokens -= it.n_tokens
                return True
        return False

    def next_batch(self) -> list[PrefillItem]:
        """Take the next batch off the queue (empty when nothing waits)."""
        batch: list[PrefillItem] = []
        tokens = 0
        for it in self._waiting:
            if len(batch) == self.max_batch or (batch and tokens + it.n_tokens > self.token_budget):
                break
            batch.append(it)
            tokens += it.n_tokens
        del self._waiting[: len(batch)]
        self.queued_tokens -= tokens
        return batch
