"""StallMeter: the share of a decode worker's recent time spent in local prefills."""
import pytest

from orchestrator.core.stall import MAX_FRACTION, StallMeter


def test_fraction_counts_what_ended_within_the_window_and_forgets_the_rest():
    m = StallMeter(window_s=10.0)
    assert m.fraction(0.0) == 0.0
    m.add(1.0, 0.5)
    m.add(4.0, 1.5)
    assert m.fraction(5.0) == pytest.approx(0.2)
    assert m.fraction(11.5) == pytest.approx(0.15)  # the first ended more than 10 s ago
    assert m.fraction(20.0) == 0.0


def test_fraction_is_capped_and_bad_windows_are_refused():
    m = StallMeter(window_s=1.0)
    m.add(0.5, 5.0)
    assert m.fraction(0.5) == MAX_FRACTION < 1.0
    with pytest.raises(ValueError, match="window_s"):
        StallMeter(window_s=0.0)
