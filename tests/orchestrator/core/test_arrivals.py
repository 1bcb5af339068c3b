"""ArrivalMeter and the predictor's overtaking term: later prompts with tighter TTFT targets run first."""
import pytest

from orchestrator.core.arrivals import ArrivalMeter
from orchestrator.core.predictor import Estimate, overtaken


def test_loads_per_target_over_the_window():
    m = ArrivalMeter(seconds_per_token=1.0, window_s=10.0)  # a token's prefill: a second
    m.add(0.0, 1.5, 2.0)
    m.add(5.0, 1.5, 1.0)
    m.add(6.0, 20.0, 4.0)
    assert m.loads(9.0) == ((1.5, pytest.approx(0.3)), (20.0, pytest.approx(0.4)))
    assert m.loads(12.0) == ((1.5, pytest.approx(0.1)), (20.0, pytest.approx(0.4)))  # the first left
    assert m.loads(16.5) == ()  # all gone, targets too
    with pytest.raises(ValueError, match="window_s"):
        ArrivalMeter(1.0, window_s=0.0)


def test_only_tighter_targets_overtake_and_only_for_their_head_start():
    wait = Estimate(1.0, 2.0)
    assert overtaken(wait, ((20.0, 0.5),), 1.5, 1.0, 1.0) == wait  # looser: runs after it
    assert overtaken(wait, ((1.5, 0.5),), 1.5, 1.0, 1.0) == wait  # the same target: arrival order
    # 0.5 s of work a second with a target 18.5 s tighter: W = 1 / (1 - 0.5) = 2 s, all within 18.5 s
    got = overtaken(wait, ((1.5, 0.5),), 20.0, 1.0, 1.0)
    assert got.point_s == pytest.approx(1.0 + 0.5 * 2.0) and got.bound_s == pytest.approx(2.0 + 0.5 * 4.0)
    # a head start of 1 s caps what overtakes it at 1 s of arrivals
    assert overtaken(wait, ((19.0, 0.5),), 20.0, 1.0, 1.0).point_s == pytest.approx(1.0 + 0.5 * 1.0)
    # the correction's factors scale the arriving work as they scale the queue's
    assert overtaken(wait, ((1.5, 0.25),), 20.0, 2.0, 2.0).point_s == pytest.approx(2.0)
    # a load past saturation stays finite
    assert overtaken(wait, ((1.5, 5.0),), 20.0, 1.0, 1.0).point_s == pytest.approx(1.0 + 5.0 * 10.0)
