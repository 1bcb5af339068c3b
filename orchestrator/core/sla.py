"""The SLA target of a request and the one rule for whether a request met it.

The config's named classes (cluster.yaml `metadata.sla_classes`), a request's targets after
validation, the router and the simulator all use `SLATarget`; the live frontend's metrics, the
live bench and the simulator's report all decide "met" with `sla_met`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class SLATarget:
    """Latency targets in milliseconds: time to first token and mean time per output token after it."""

    ttft_ms: float
    tpot_ms: float
    priority: int = 0
    sla_class: str = ""  # the named class the targets came from ("" when given directly)


def _ms(value) -> np.ndarray:
    return np.asarray(np.nan if value is None else value, dtype=np.float64)


def ttft_met(sla: SLATarget, ttft_ms):
    """TTFT within the target; None or NaN (no first token) is a miss. Elementwise over arrays."""
    met = _ms(ttft_ms) <= sla.ttft_ms
    return bool(met) if met.ndim == 0 else met


def tpot_met(sla: SLATarget, tpot_ms):
    """TPOT within the target; None or NaN means undefined (a one-token request has no time between
    tokens) and counts as met. Elementwise over arrays."""
    met = ~(_ms(tpot_ms) > sla.tpot_ms)
    return bool(met) if met.ndim == 0 else met


def sla_met(sla: SLATarget, ttft_ms, tpot_ms):
    """Both targets met (ttft_met and tpot_met): a bool for scalars, a bool array for arrays.

    Only for requests that finished: an unfinished one has no TPOT either, and is a miss.
    """
    met = np.logical_and(ttft_met(sla, ttft_ms), tpot_met(sla, tpot_ms))
    return bool(met) if met.ndim == 0 else met
