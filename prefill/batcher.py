"""Groups waiting prompts into prefill batches under a token budget.

Pure policy (no clock, no I/O): the live PrefillWorker and the simulator both drive it.
Order: higher priority first, then arrival (FCFS). A batch takes prompts in that order while
their total stays within `token_budget` and the count within `max_batch`; a prompt longer than
the budget runs alone rather than waiting forever. Skipping ahead is not allowed, so a long
prompt is never starved by a stream of short ones.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PrefillItem:
    request_id: str
    n_tokens: int
    arrival_s: float
    priority: int = 0


def _order(item: PrefillItem) -> tuple[int, float]:
    return (-item.priority, item.arrival_s)


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
