"""Online corrections of the latency predictor: observed/predicted ratios per worker and phase.

Pure data structure (no clock, no I/O): callers report what happened with `observe(worker, phase,
observed_s, predicted_s)`; `factors(worker, phase)` returns the multipliers the predictor applies to
that phase's perf-model time: the window's median for the point estimate and its q-quantile for
the bound. The "tpot" phase learns differences instead (`offsets`): see below. Phases: "ttft" (a
request's whole TTFT against the prediction from the parts, keyed by `ttft_key`: prefill worker and
TTFT-target class; it learns the queue's dynamics the parts do not model: later arrivals with
earlier deadlines overtaking, later prompts joining its batch, the frontend), "prefill" (a batch's compute on a prefill worker), "transfer" (the exposed KV
tail, keyed by the sending prefill worker), "decode" (one decode step on a decode worker), and two
of a request's decode on its decode worker, from what that worker measured (TokenChunk.stepping_s:
the start of its first step to the end of its last, the local prefills between them included):
"sharing" (its mean step so measured against the step the predictor forecast at placement, at the
measured step speed: who would share its steps, the stalls that would hold them up; it learns that
forecast's bias) and "tpot" (its whole TPOT against its predicted wait before the first step plus
that measured time: what lies outside the steps, the handoff and the output poll). The steps' own
speed, a shared host's included, is the "decode" factor's. What "tpot" adds does not grow with the
step, so it is learned as seconds per step, observed - predicted, and added (`offsets`). Learning
"tpot" against the forecast itself (as before) put the forecast's misses into it: in a live replay,
the batch growing under the first requests taught it +100 ms a step, which every later prediction
and every running sequence's protection then carried.

Prior (fewer than `min_samples` observations): the ratio is log-normal with median 1 and log
standard deviation `prior_sigma` (0.1: the perf model is calibrated to ~10% of published trn2/CS-3
figures, hardware/profiles.py), so the bound factor is exp(z_q * prior_sigma), 1.137 at p90. The
"tpot" phase's prior is an offset of 0 for both, "sharing"'s a factor of 1 for both: they adjust
parts whose bounds carry the "decode" prior already.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from statistics import NormalDist

# a request's TPOT is learned from ("tpot") only with at least this many gaps: a short output's one or
# two gaps are mostly fixed per-request costs (the handoff to the decode worker, the output poll), a
# ratio of which would inflate every longer request's prediction and bound
TPOT_MIN_GAPS = 8
PHASES = ("prefill", "transfer", "decode", "ttft", "tpot", "sharing", "local_prefill")  # local_prefill: on a
# decode worker
ADDITIVE = frozenset({"tpot"})  # phases learned as observed - predicted seconds (`offsets`), not ratios
UNIT_PRIOR = frozenset({"sharing"})  # ratio phases whose prior is 1 for the bound too (module docstring)


@dataclass(frozen=True, slots=True)
class Factors:
    """Multipliers of a phase's perf-model seconds (dimensionless)."""

    point: float  # median observed/predicted ratio
    bound: float  # q-quantile of the ratio


@dataclass(frozen=True, slots=True)
class Offsets:
    """Seconds added to an additive phase's prediction."""

    point_s: float  # median observed - predicted
    bound_s: float  # q-quantile of it


NO_OFFSET = Offsets(0.0, 0.0)
NO_FACTOR = Factors(1.0, 1.0)


def _finite(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    return float(value)


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated q-quantile of an ascending list (numpy's default method)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


_TTFT_KEYS: dict[tuple[str, float], str] = {}


def ttft_key(worker: str, ttft_s: float) -> str:
    """The "ttft" phase's key: the worker and its TTFT target rounded up to a power of two seconds
    (requests of one class share a window; arbitrary per-request targets fall into few windows)."""
    bucket = 2.0 ** math.ceil(math.log2(ttft_s))
    key = _TTFT_KEYS.get((worker, bucket))
    if key is None:
        key = _TTFT_KEYS[(worker, bucket)] = f"{worker}|ttft<={bucket:g}s"
    return key


def check_quantile(q: float) -> float:
    """ValueError naming `quantile` unless 0 < q < 1."""
    if not isinstance(q, (int, float)) or not 0.0 < q < 1.0:  # NaN fails both comparisons
        raise ValueError(f"quantile: must be in (0, 1), got {q!r}")
    return float(q)


class Corrections:
    """Bounded windows of observed/predicted ratios (differences for ADDITIVE phases), one per (worker, phase)."""

    def __init__(self, quantile: float = 0.9, window: int = 64, min_samples: int = 5,
                 prior_sigma: float = 0.1):
        self.quantile = check_quantile(quantile)
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window: must be an integer >= 1, got {window!r}")
        if not isinstance(min_samples, int) or not 1 <= min_samples <= window:
            raise ValueError(f"min_samples: must be an integer in [1, window={window}], got {min_samples!r}")
        if _finite("prior_sigma", prior_sigma) < 0:
            raise ValueError(f"prior_sigma: must be >= 0, got {prior_sigma!r}")
        self.window, self.min_samples = window, min_samples
        self.prior = Factors(1.0, math.exp(NormalDist().inv_cdf(self.quantile) * prior_sigma))
        self._ratios: dict[tuple[str, str], deque[float]] = {}  # ADDITIVE phases: differences, seconds
        self._cache: dict[tuple[str, str], Factors | Offsets] = {}
        self.version = 0  # bumped by every observe() and forget(): callers cache factor vectors on it

    def observe(self, worker: str, phase: str, observed_s: float, predicted_s: float) -> None:
        """Record one phase's observed and predicted seconds (the oldest ratio drops out when full)."""
        if phase not in PHASES:
            raise ValueError(f"phase: unknown {phase!r}; valid: {', '.join(PHASES)}")
        if _finite("observed_s", observed_s) < 0:
            raise ValueError(f"observed_s: must be >= 0, got {observed_s!r}")
        if _finite("predicted_s", predicted_s) <= 0:
            raise ValueError(f"predicted_s: must be > 0, got {predicted_s!r}")
        key = (worker, phase)
        ratios = self._ratios.get(key)
        if ratios is None:
            ratios = self._ratios[key] = deque(maxlen=self.window)
        ratios.append(observed_s - predicted_s if phase in ADDITIVE else observed_s / predicted_s)
        self._cache.pop(key, None)
        self.version += 1

    def observe_decode(self, worker: str, tpot_s: float, stepping_s: float, gaps: int, wait_s: float,
                       step_model_s: float, sharing: bool) -> None:
        """A finished request's decode on `worker`, as the live engine and the simulator both report it:
        `stepping_s` from its first step's start to its last's end over its `gaps` gaps, its TPOT `tpot_s`,
        and what its placement predicted, `wait_s` before its first step and `step_model_s` a step. The
        "sharing" ratio learns only when `sharing` (its forecast was made on a whole window of arrivals)."""
        if sharing:
            self.observe(worker, "sharing", stepping_s / gaps, step_model_s)
        self.observe(worker, "tpot", tpot_s, (wait_s + stepping_s) / gaps)

    def samples(self, worker: str, phase: str) -> int:
        ratios = self._ratios.get((worker, phase))
        return len(ratios) if ratios else 0

    def warm(self, worker: str, phase: str) -> bool:
        """The phase has min_samples observations on the worker: its factors are learned, not the prior."""
        return self.samples(worker, phase) >= self.min_samples

    def factors(self, worker: str, phase: str) -> Factors:
        """Point and bound multipliers for a phase on a worker (the prior until min_samples)."""
        if phase in ADDITIVE:
            raise ValueError(f"phase: {phase!r} is learned as an offset; use offsets()")
        return self._learned(worker, phase, Factors) or (NO_FACTOR if phase in UNIT_PRIOR else self.prior)

    def offsets(self, worker: str, phase: str) -> Offsets:
        """Point and bound seconds added to an ADDITIVE phase on a worker (0 until min_samples)."""
        if phase not in ADDITIVE:
            raise ValueError(f"phase: {phase!r} is learned as a ratio; use factors()")
        return self._learned(worker, phase, Offsets) or NO_OFFSET

    def _learned(self, worker: str, phase: str, kind: type) -> Factors | Offsets | None:
        """The window's (median, q-quantile) as `kind`; None until min_samples."""
        key = (worker, phase)
        got = self._cache.get(key)
        if got is not None:
            return got
        ratios = self._ratios.get(key)
        if ratios is None or len(ratios) < self.min_samples:
            return None
        s = sorted(ratios)
        got = self._cache[key] = kind(quantile(s, 0.5), quantile(s, self.quantile))
        return got

    def remaining(self, worker: str, phase: str, model_s: float, elapsed_s: float) -> tuple[float, float]:
        """Seconds left (point, bound) of a phase's work in progress, `elapsed_s` into it, whose perf-model
        time is `model_s`: its ratio is one that exceeds elapsed_s / model_s, so the point and bound are
        the median and q-quantile of the window's ratios above that. When it has overrun every ratio
        seen (or the window is not warm and it has overrun the prior's point), it is taken to be as far
        again beyond its ratio so far as the window's bound is from its point (also for a quantile below
        0.5), the bound once more (below 0.5: between now and the point, in log, at q / 0.5 of the way)."""
        f, so_far = self.factors(worker, phase), elapsed_s / model_s
        ratios = self._ratios.get((worker, phase)) if self.warm(worker, phase) else None
        above = sorted(r for r in ratios if r > so_far) if ratios else []
        if above:
            point, bound = quantile(above, 0.5), quantile(above, self.quantile)
        elif so_far < f.point:  # not warm, not overrun: the prior
            point, bound = f.point, f.bound
        else:  # overrun: it runs on by the window's spread, the distance of its bound from its point
            ratio = f.bound / f.point if f.point > 0 and f.bound > 0 else 1.0
            if self.quantile >= 0.5:  # the bound as far again above the point
                point = so_far * ratio
                bound = point * ratio
            else:  # the bound between now and the point, in log, q / 0.5 of the way
                point = so_far / ratio
                bound = so_far * (1.0 / ratio) ** (self.quantile / 0.5)
        return max(0.0, point * model_s - elapsed_s), max(0.0, bound * model_s - elapsed_s)

    def forget(self, worker: str) -> None:
        """Drop a worker's windows, its "ttft" ones included (it was replaced or restarted)."""
        for key in [k for k in self._ratios if k[0] == worker or k[0].startswith(f"{worker}|ttft<=")]:
            del self._ratios[key]
            self._cache.pop(key, None)
        self.version += 1
