"""How much of a decode worker's time local prefills take: the stretch they put on every step.

Pure (times are arguments). The live engine and the simulator add each local prefill a decode
worker ran (conditional disaggregation: it prefills between two steps, holding up its batch) and
read `fraction(now)`, the share of the last `window_s` seconds spent so (of the time since the meter
started, while that is shorter: a young meter does not dilute its first prefills over time it never
saw); the predictor stretches that worker's steps by 1 / (1 - fraction) (DecodeState.stall_fraction).
"""
from __future__ import annotations

import math
from collections import deque

STALL_WINDOW_S = 10.0  # seconds of history: long enough to hold many prefills, short enough to follow load
MAX_FRACTION = 0.9  # a reading is capped here: the stretch stays finite


class WindowSum:
    """Seconds added over a sliding window of `window_s` seconds (also orchestrator/core/arrivals.py)."""

    def __init__(self, window_s: float):
        if not window_s > 0:
            raise ValueError(f"window_s: must be > 0, got {window_s!r}")
        self.window_s = window_s
        self._runs: deque[tuple[float, float]] = deque()  # (time, seconds), ascending time
        self._sum = 0.0

    def add(self, end_s: float, seconds: float) -> None:
        """`seconds` of work counted at `end_s` (the clock of `total`'s `now`)."""
        self._runs.append((end_s, seconds))
        self._sum += seconds

    def total(self, now: float) -> float:
        """Seconds counted in (now - window, now]."""
        while self._runs and self._runs[0][0] <= now - self.window_s:
            self._sum -= self._runs.popleft()[1]
        if not self._runs:
            self._sum = 0.0  # no drift from float sums
        return self._sum

    def count(self, now: float) -> int:
        """How many additions are in (now - window, now]."""
        self.total(now)
        return len(self._runs)

    @property
    def empty(self) -> bool:
        """Nothing counted since the last `total` dropped what left the window."""
        return not self._runs


class StallMeter(WindowSum):
    """Local prefill seconds of one decode worker over a sliding window (`add(end_s, seconds)` per prefill),
    watching since `start_s` (the clock of `now`; -inf: as if for ever)."""

    def __init__(self, window_s: float = STALL_WINDOW_S, start_s: float = -math.inf):
        super().__init__(window_s)
        self.start_s = start_s

    def fraction(self, now: float) -> float:
        """Share of (max(now - window, start), now] spent in local prefills, in [0, MAX_FRACTION]."""
        span = min(self.window_s, now - self.start_s)
        if not span > 0:
            return 0.0
        return min(MAX_FRACTION, max(0.0, self.total(now) / span))
