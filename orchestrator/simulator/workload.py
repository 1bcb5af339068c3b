"""Simulated arrivals: an Azure trace (optionally rescaled to a target rate) or Poisson."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.core.sla import SLATarget
from orchestrator.core.trace import TraceError, check_rate, load_azure_trace, time_scale

__all__ = ["SimRequest", "from_trace", "poisson", "TraceError"]


@dataclass(frozen=True, slots=True)
class SimRequest:
    rid: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int  # tokens generated, the first one by the prefill
    sla: SLATarget | None = None  # its class's targets (None: the run's SimConfig.sla)


def from_trace(path: str | Path, rate: float | None = None, limit: int | None = None) -> list[SimRequest]:
    """Requests of an Azure CSV; with `rate`, arrival times are scaled so the mean rate is `rate`/s."""
    if rate is not None:
        check_rate(rate)
    rows = load_azure_trace(path, limit)
    scale = 1.0 if rate is None else time_scale([r.arrival_s for r in rows], rate)
    return [SimRequest(i, r.arrival_s * scale, max(1, r.prompt_tokens), max(1, r.output_tokens))
            for i, r in enumerate(rows)]


def poisson(rate: float, n: int, lengths: list[tuple[int, int]], seed: int = 0) -> list[SimRequest]:
    """n Poisson arrivals at `rate`/s; (prompt, output) lengths drawn from `lengths` with replacement."""
    check_rate(rate)
    if not lengths:
        raise ValueError("lengths: need at least one (prompt, output) pair")
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1.0 / rate, n))
    idx = rng.integers(0, len(lengths), n)
    return [SimRequest(i, float(times[i]), max(1, lengths[j][0]), max(1, lengths[j][1]))
            for i, j in enumerate(idx)]


def rescale(reqs: list[SimRequest], rate: float) -> list[SimRequest]:
    """The same requests with arrival times scaled to a mean rate of `rate`/s (trace.time_scale)."""
    k = time_scale([r.arrival_s for r in reqs], rate)
    return [SimRequest(r.rid, r.arrival_s * k, r.prompt_tokens, r.output_tokens, r.sla) for r in reqs]
