"""The online step-time model behind DecodeLoad."""
from __future__ import annotations

import pytest

from decode.steptime import StepTimeModel


def test_prior_then_fit_of_a_linear_cost():
    m = StepTimeModel(prior_fixed_ms=10.0, prior_per_seq_ms=1.0)
    assert m.predict(0, 0) == 0.0 and m.predict(4, 400) == pytest.approx(14.0)
    m.observe(4, 400, 28.0)  # twice the prior: scaled until the batch sizes spread
    assert m.predict(4, 400) == pytest.approx(28.0)
    for b in (1, 2, 8, 16, 32, 64):
        for ctx in (100, 200):
            m.observe(b, b * ctx, 5.0 + 0.5 * b + 0.01 * b * ctx)
    assert m.predict(40, 40 * 150) == pytest.approx(5.0 + 20.0 + 60.0, rel=2e-2)  # the first sample is off the line
