"""The one "SLA met" rule: each target on its own, one-token requests, missing values, arrays."""
import math

import numpy as np
import pytest

from orchestrator.core.sla import SLATarget, sla_met, tpot_met, ttft_met

SLA = SLATarget(ttft_ms=500.0, tpot_ms=50.0)


@pytest.mark.parametrize("ttft,tpot,met", [
    (100.0, 20.0, True),
    (500.0, 50.0, True),  # a target is an upper bound, reaching it is met
    (500.1, 20.0, False),
    (100.0, 50.1, False),
    (100.0, None, True),  # one token: no TPOT, met on TPOT
    (100.0, math.nan, True),
    (None, None, False),  # no first token
    (math.nan, 20.0, False),
    (900.0, None, False),  # one token, but late
])
def test_scalar_cases(ttft, tpot, met):
    assert sla_met(SLA, ttft, tpot) is met


def test_each_target_alone():
    assert ttft_met(SLA, 500.0) is True and ttft_met(SLA, 501.0) is False and ttft_met(SLA, None) is False
    assert tpot_met(SLA, 50.0) is True and tpot_met(SLA, 51.0) is False and tpot_met(SLA, None) is True


def test_arrays_elementwise_match_the_scalar_rule():
    ttft = np.array([100.0, 600.0, np.nan, 100.0, 100.0])
    tpot = np.array([20.0, 20.0, 20.0, np.nan, 70.0])
    got = sla_met(SLA, ttft, tpot)
    assert got.dtype == bool and got.tolist() == [True, False, False, True, False]
    assert got.tolist() == [sla_met(SLA, float(a), float(b)) for a, b in zip(ttft, tpot)]
