"""Prefill work arriving at a prefill worker, by TTFT target: what will overtake a prompt it queues.

Pure (times are arguments). The simulator and the live engine add each prompt they place on a
prefill worker, counted as perf-model seconds of prefill (`per_token_s`: a full batch's time per token);
`loads(now)` gives, for each TTFT target seen in the last `window_s` seconds, the prefill seconds
per second that arrived with it (PrefillState.arrivals). The batcher runs the earliest deadline
(arrival + target) first, so a prompt that arrives later with a target tighter by d seconds runs
first if it comes within d seconds: the predictor lengthens a newcomer's queue wait by that work.
"""
from __future__ import annotations

from hardware.perf import Deployment, prefill_time
from orchestrator.core.stall import WindowSum

ARRIVAL_WINDOW_S = 10.0  # seconds of history: many arrivals, and it still follows a burst


def per_token_s(dep: Deployment, token_budget: int) -> float:
    """Perf-model seconds per prompt token in a full batch of `token_budget` tokens."""
    return prefill_time(dep, [token_budget]) / token_budget


class ArrivalMeter:
    """Prefill seconds placed on one worker over a sliding window, per TTFT target."""

    def __init__(self, seconds_per_token: float, window_s: float = ARRIVAL_WINDOW_S):
        """`seconds_per_token`: the worker's prefill time per prompt token (`per_token_s`)."""
        if not window_s > 0:
            raise ValueError(f"window_s: must be > 0, got {window_s!r}")
        self.seconds_per_token, self.window_s = seconds_per_token, window_s
        self._by_target: dict[float, WindowSum] = {}  # TTFT target -> its prompts' prefill seconds

    def add(self, now: float, ttft_s: float, tokens: int) -> None:
        """A prompt of `tokens` tokens with TTFT target `ttft_s` was placed at `now`."""
        window = self._by_target.get(ttft_s)
        if window is None:
            window = self._by_target[ttft_s] = WindowSum(self.window_s)
        window.add(now, tokens * self.seconds_per_token)

    def loads(self, now: float) -> tuple[tuple[float, float], ...]:
        """(TTFT target, prefill seconds per second) of the last window, ascending target."""
        out = []
        for target, window in list(self._by_target.items()):
            seconds = window.total(now)
            if window.empty:
                del self._by_target[target]  # gone from the window
            else:
                out.append((target, seconds / self.window_s))
        return tuple(sorted(out))
