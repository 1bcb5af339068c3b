"""Prefill work arriving at a prefill worker, by TTFT target: what will overtake a prompt it queues.

Pure (times are arguments). The simulator and the live engine add each prompt they place on a
prefill worker, as perf-model seconds of prefill (`per_token_s`: a full batch's time per token);
`loads(now)` gives, for each TTFT target seen in the last `window_s` seconds, the prefill seconds
per second that arrived with it (PrefillState.arrivals). The batcher runs the earliest deadline
(arrival + target) first, so a prompt that arrives later with a target tighter by d seconds runs
first if it comes within d seconds: the predictor lengthens a newcomer's queue wait by that work.
"""
from __future__ import annotations

from collections import deque

from hardware.perf import Deployment, prefill_time

ARRIVAL_WINDOW_S = 10.0  # seconds of history: many arrivals, and it still follows a burst


def per_token_s(dep: Deployment, token_budget: int) -> float:
    """Perf-model seconds per prompt token in a full batch of `token_budget` tokens."""
    return prefill_time(dep, [token_budget]) / token_budget


class ArrivalMeter:
    """Prefill seconds placed on one worker over a sliding window, per TTFT target."""

    def __init__(self, window_s: float = ARRIVAL_WINDOW_S):
        if not window_s > 0:
            raise ValueError(f"window_s: must be > 0, got {window_s!r}")
        self.window_s = window_s
        self._added: deque[tuple[float, float, float]] = deque()  # (time, TTFT target, seconds), ascending time
        self._sums: dict[float, list] = {}  # TTFT target -> [seconds, prompts] within the window

    def add(self, now: float, ttft_s: float, seconds: float) -> None:
        """A prompt of `seconds` of prefill with TTFT target `ttft_s` was placed at `now`."""
        self._added.append((now, ttft_s, seconds))
        got = self._sums.setdefault(ttft_s, [0.0, 0])
        got[0] += seconds
        got[1] += 1

    def loads(self, now: float) -> tuple[tuple[float, float], ...]:
        """(TTFT target, prefill seconds per second) of the last window, ascending target."""
        while self._added and self._added[0][0] <= now - self.window_s:
            _, target, seconds = self._added.popleft()
            got = self._sums[target]
            got[0] -= seconds
            got[1] -= 1
            if not got[1]:
                del self._sums[target]  # gone from the window (and no float residue)
        return tuple(sorted((t, s / self.window_s) for t, (s, _) in self._sums.items()))
