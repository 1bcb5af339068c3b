"""ArrivalMeter and the predictor's overtaking term: later prompts with tighter TTFT targets run first;
DecodeArrivals and `joined`: the sequences still to be placed on a decode worker that will share its steps."""
import pytest

from orchestrator.core.arrivals import MIN_SPAN_S, ArrivalMeter, DecodeArrivals, joined
from orchestrator.core.predictor import Estimate, overtaken


def test_loads_per_target_over_the_recent_and_the_long_window():
    m = ArrivalMeter(seconds_per_token=1.0, window_s=10.0, long_window_s=40.0)  # a token's prefill: a second
    assert m.loads(0.0) == ()
    m.add(0.0, 1.5, 2.0)
    m.add(5.0, 1.5, 1.0)
    m.add(6.0, 20.0, 4.0)
    # the long load is over the time since the first prompt while the meter is younger than its window
    # (but at least the recent window): here 10 s, so both agree
    assert m.loads(9.0) == ((1.5, pytest.approx(0.3), pytest.approx(0.3)), (20.0, pytest.approx(0.4), pytest.approx(0.4)))
    # the first left the recent window, not the long one (12 s since the first prompt)
    assert m.loads(12.0) == ((1.5, pytest.approx(0.1), pytest.approx(3.0 / 12.0)),
                             (20.0, pytest.approx(0.4), pytest.approx(4.0 / 12.0)))
    # past the recent window only the long load remains; the long window is full at 40 s
    assert m.loads(30.0) == ((1.5, 0.0, pytest.approx(3.0 / 30.0)), (20.0, 0.0, pytest.approx(4.0 / 30.0)))
    assert m.loads(44.0) == ((1.5, 0.0, pytest.approx(1.0 / 40.0)), (20.0, 0.0, pytest.approx(4.0 / 40.0)))
    assert m.loads(46.5) == ()  # all gone, targets too
    with pytest.raises(ValueError, match="window_s"):
        ArrivalMeter(1.0, window_s=0.0)
    with pytest.raises(ValueError, match="long_window_s"):
        ArrivalMeter(1.0, window_s=10.0, long_window_s=5.0)


def test_only_tighter_targets_overtake_and_only_for_their_head_start():
    wait = Estimate(1.0, 2.0)
    assert overtaken(wait, ((20.0, 0.5, 0.5),), 1.5, 1.0, 1.0) == wait  # looser: runs after it
    assert overtaken(wait, ((1.5, 0.5, 0.5),), 1.5, 1.0, 1.0) == wait  # the same target: arrival order
    # 0.5 s of work a second with a target 18.5 s tighter: W = 1 / (1 - 0.5) = 2 s, all within 18.5 s
    got = overtaken(wait, ((1.5, 0.5, 0.5),), 20.0, 1.0, 1.0)
    assert got.point_s == pytest.approx(1.0 + 0.5 * 2.0) and got.bound_s == pytest.approx(2.0 + 0.5 * 4.0)
    # a head start of 1 s caps what overtakes it at 1 s of arrivals
    assert overtaken(wait, ((19.0, 0.5, 0.5),), 20.0, 1.0, 1.0).point_s == pytest.approx(1.0 + 0.5 * 1.0)
    # the correction's factors scale the arriving work as they scale the queue's
    assert overtaken(wait, ((1.5, 0.25, 0.25),), 20.0, 2.0, 2.0).point_s == pytest.approx(2.0)
    # a load past saturation stays finite
    assert overtaken(wait, ((1.5, 5.0, 5.0),), 20.0, 1.0, 1.0).point_s == pytest.approx(1.0 + 5.0 * 10.0)


def test_the_recent_load_forecasts_the_first_seconds_of_a_wait_and_the_long_run_load_the_rest():
    # within the horizon the long-run load plays no part
    short = Estimate(1.0, 1.0)
    assert overtaken(short, ((1.5, 0.5, 0.1),), 20.0, 1.0, 1.0, horizon_s=10.0) == overtaken(
        short, ((1.5, 0.5, 0.5),), 20.0, 1.0, 1.0, horizon_s=10.0)
    # W0 = 8 s at a recent load of 0.5 would wait 16 s; beyond 10 s the load is 0.1:
    # W* = (8 + (0.5 - 0.1) x 10) / (1 - 0.1) = 13.33 s, and W = 8 + 0.5 x 10 + 0.1 x 3.33
    long = overtaken(Estimate(8.0, 8.0), ((1.5, 0.5, 0.1),), 20.0, 1.0, 1.0, horizon_s=10.0)
    assert long.point_s == pytest.approx(8.0 + 5.0 + 0.1 * (12.0 / 0.9 - 10.0))
    # a burst that lasts (the same load over both horizons) is the one-horizon answer
    assert overtaken(Estimate(8.0, 8.0), ((1.5, 0.5, 0.5),), 20.0, 1.0, 1.0, horizon_s=10.0).point_s == (
        pytest.approx(8.0 + 0.5 * 16.0))
    # continuous where the wait crosses the horizon: W0 = 5 s at 0.5 waits exactly 10 s either way
    at = [overtaken(Estimate(w0, w0), ((1.5, 0.5, 0.1),), 20.0, 1.0, 1.0, horizon_s=10.0).point_s
          for w0 in (5.0 - 1e-9, 5.0 + 1e-9)]
    assert at[0] == pytest.approx(at[1])


def test_decode_arrivals_rate_over_the_window_or_the_meters_age_and_their_mean_steps():
    m = DecodeArrivals(window_s=10.0)
    assert m.rate(0.0) == (0.0, 0.0)
    m.add(100.0, 10)
    assert m.rate(100.0) == (pytest.approx(1.0 / MIN_SPAN_S), 10.0)  # a young meter: at least MIN_SPAN_S
    m.add(102.0, 30)
    assert m.rate(104.0) == (pytest.approx(2.0 / 4.0), pytest.approx(20.0))  # over its 4 s of age
    m.add(111.0, 50)
    assert m.rate(111.0) == (pytest.approx(2.0 / 10.0), pytest.approx(40.0))  # the first left the window
    assert m.rate(122.0) == (0.0, 0.0)  # none left


def test_decode_arrivals_have_seen_a_window_once_a_window_has_passed_since_the_first():
    m = DecodeArrivals(window_s=10.0)
    assert not m.seen_window(50.0)  # nothing placed yet
    m.add(100.0, 10)
    assert not m.seen_window(109.9) and m.seen_window(110.0) and m.seen_window(500.0)  # even once empty again


def test_joined_counts_who_arrives_at_a_rate_and_lasts_a_life():
    assert joined(2.0, 3.0, 1.0, 1.0) == pytest.approx(2.0)  # at 1 s: those placed in the last second
    assert joined(2.0, 3.0, 5.0, 5.0) == pytest.approx(6.0)  # past a life: the steady state, rate x life
    assert joined(2.0, 3.0, 0.0, 2.0) == pytest.approx(2.0)  # mean of 2t over [0, 2]
    assert joined(2.0, 3.0, 0.0, 6.0) == pytest.approx(2.0 * (4.5 + 9.0) / 6.0)  # the ramp, then steady
    assert joined(0.0, 3.0, 0.0, 6.0) == 0.0 and joined(2.0, 0.0, 0.0, 6.0) == 0.0
