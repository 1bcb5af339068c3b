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


def test_a_young_meter_divides_by_the_time_it_has_watched():
    """2 s after it started, 0.5 s of prefills is a quarter of its time, not a twentieth of a window."""
    m = StallMeter(window_s=10.0, start_s=100.0)
    assert m.fraction(100.0) == 0.0  # nothing watched yet
    m.add(101.0, 0.5)
    assert m.fraction(102.0) == pytest.approx(0.25)
    assert m.fraction(106.0) == pytest.approx(0.5 / 6.0)
    assert m.fraction(115.0) == pytest.approx(0.0)  # the window has moved past it
    m.add(115.0, 2.0)
    assert m.fraction(116.0) == pytest.approx(0.2)  # a full window now
