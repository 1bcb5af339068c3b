"""Work arriving at a worker: prefill work by TTFT target (what will overtake a prompt a prefill worker
queues, `ArrivalMeter`) and sequences placed on a decode worker (who will join a newcomer's steps,
`DecodeArrivals`).

Pure (times are arguments). The simulator and the live engine add each prompt they place on a
prefill worker, counted as perf-model seconds of prefill (`per_token_s`: a full batch's time per token);
`loads(now)` gives, for each TTFT target seen lately, the prefill seconds per second that arrived with
it over two windows (PrefillState.arrivals): the last `window_s` seconds, which forecast the first
OVERTAKE_HORIZON_S seconds of a wait, and the last `long_window_s`, which forecast the rest (a burst
passes: over a long wait the load reverts to its mean). The batcher runs the earliest deadline (arrival +
target) first, so a prompt that arrives later with a target tighter by d seconds runs first if it
comes within d seconds: the predictor lengthens a newcomer's queue wait by that work (`overtaken`).
"""
from __future__ import annotations

from hardware.perf import Deployment, prefill_time
from orchestrator.core.stall import WindowSum

ARRIVAL_WINDOW_S = 10.0  # seconds of history: many arrivals, and it still follows a burst
LONG_WINDOW_S = 240.0  # seconds of history for the load beyond the first OVERTAKE_HORIZON_S of a wait
# Seconds of a wait for which the recent load holds. Measured in the simulator (router-comparison, runs
# that admit everything, `batch` prompts queued 14-25 s behind interactive ones): the interactive work
# placed on their worker while they waited was 0.53-0.60 of its recent 10 s load at placement and
# 0.94-1.09 of its long-run load; over waits of 8-14 s, 0.74-1.09 of the recent load. A wait is long
# when a burst has just filled the queue, and the burst passes within a few seconds. With 10 s (the
# window's length, before) long waits were over-predicted by a median 11-18%.
OVERTAKE_HORIZON_S = 2.5
# A decode meter younger than its window divides by its age, but by at least this: its first placements
# are not read as a burst
MIN_SPAN_S = 1.0


def per_token_s(dep: Deployment, token_budget: int) -> float:
    """Perf-model seconds per prompt token in a full batch of `token_budget` tokens."""
    return prefill_time(dep, [token_budget]) / token_budget


class ArrivalMeter:
    """Prefill seconds placed on one worker over two sliding windows, per TTFT target."""

    def __init__(self, seconds_per_token: float, window_s: float = ARRIVAL_WINDOW_S,
                 long_window_s: float = LONG_WINDOW_S):
        """`seconds_per_token`: the worker's prefill time per prompt token (`per_token_s`)."""
        if not window_s > 0:
            raise ValueError(f"window_s: must be > 0, got {window_s!r}")
        if not long_window_s >= window_s:
            raise ValueError(f"long_window_s: must be >= window_s ({window_s!r}), got {long_window_s!r}")
        self.seconds_per_token, self.window_s, self.long_window_s = seconds_per_token, window_s, long_window_s
        self._by_target: dict[float, tuple[WindowSum, WindowSum]] = {}  # TTFT target -> (recent, long) windows
        self._first_s: float | None = None  # when the first prompt was added

    def add(self, now: float, ttft_s: float, tokens: int) -> None:
        """A prompt of `tokens` tokens with TTFT target `ttft_s` was placed at `now`."""
        windows = self._by_target.get(ttft_s)
        if windows is None:
            windows = self._by_target[ttft_s] = (WindowSum(self.window_s), WindowSum(self.long_window_s))
        if self._first_s is None:
            self._first_s = now
        seconds = tokens * self.seconds_per_token
        for window in windows:
            window.add(now, seconds)

    def loads(self, now: float) -> tuple[tuple[float, float, float], ...]:
        """(TTFT target, prefill seconds per second over the last window_s, over the last long_window_s)
        ascending target. The long load is over the time since the first prompt when that is shorter
        (but at least window_s): a meter younger than its long window does not dilute its load."""
        if self._first_s is None:
            return ()
        span = min(self.long_window_s, max(self.window_s, now - self._first_s))
        out = []
        for target, (recent, long) in list(self._by_target.items()):
            near, far = recent.total(now), long.total(now)
            if long.empty:
                del self._by_target[target]  # gone from both windows
            else:
                out.append((target, near / self.window_s, far / span))
        return tuple(sorted(out))


class DecodeArrivals:
    """Sequences placed on one decode worker over a sliding window: the rate at which more will join its
    steps and how many steps they run (DecodeState.arriving). A newcomer's steps are shared by those
    running now until they finish, and by those placed after it while they last: without the second, a
    prediction made as a batch fills is short by all who come, and one made in a steady state by those
    who replace the ones that finish."""

    def __init__(self, window_s: float = ARRIVAL_WINDOW_S):
        self._steps = WindowSum(window_s)  # one addition per sequence: its steps
        self._first_s: float | None = None

    def add(self, now: float, steps: int) -> None:
        """A sequence of `steps` decode steps was placed at `now`."""
        if self._first_s is None:
            self._first_s = now
        self._steps.add(now, float(steps))

    def seen_window(self, at_s: float) -> bool:
        """By `at_s` the meter had watched a whole window: a forecast made then counted who comes in a
        steady state, not the first of a stream (the "sharing" correction learns only from those)."""
        return self._first_s is not None and at_s - self._first_s >= self._steps.window_s

    def rate(self, now: float) -> tuple[float, float]:
        """(sequences per second over the window, or over the meter's age when shorter but at least
        MIN_SPAN_S; their mean steps); (0, 0) when none is in the window."""
        n = self._steps.count(now)
        if not n:
            return 0.0, 0.0
        span = max(MIN_SPAN_S, min(self._steps.window_s, now - self._first_s))
        return n / span, self._steps.total(now) / n


def joined(rate: float, life_s: float, start_s: float, end_s: float) -> float:
    """Mean number of sequences placed from now on at `rate` per second, each lasting `life_s` seconds,
    that are running over [start_s, end_s] seconds from now (at start_s when end_s == start_s): at time t,
    rate x min(t, life_s)."""
    if rate <= 0 or life_s <= 0:
        return 0.0
    if end_s <= start_s:
        return rate * min(start_s, life_s)
    return rate * (_ramp_area(end_s, life_s) - _ramp_area(start_s, life_s)) / (end_s - start_s)


def _ramp_area(t: float, life_s: float) -> float:
    """Integral of min(u, life_s) du over [0, t]."""
    return t * t / 2 if t <= life_s else life_s * (t - life_s / 2)
