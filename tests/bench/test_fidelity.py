"""fidelity: the simulated trace matched request by request against the live bench's rows."""
from __future__ import annotations

import os

import numpy as np
import pytest

from orchestrator.simulator.engine import Trace
from bench.fidelity import calibration_age_s, describe, per_request_ratios


def _trace() -> Trace:
    nan = np.nan
    return Trace(arrival=np.array([0.0, 1.0, 2.0]), prompt=np.array([10, 20, 30]), output=np.array([5, 1, 3]),
                 prefill_start=np.array([0.0, 1.0, nan]), first_token=np.array([0.2, 1.5, nan]),
                 kv_ready=np.array([0.21, 1.5, nan]), admitted=np.array([0.21, 1.5, nan]),
                 finish=np.array([0.6, 1.5, nan]), rejected=np.array([False, False, True]),
                 kv_wait=np.zeros(3), ttft_target=np.full(3, 1000.0), tpot_target=np.full(3, 100.0),
                 pred_ttft=np.array([0.2, 0.5, nan]), pred_tpot=np.array([0.1, nan, nan]),
                 bound_ttft=np.array([0.25, 0.6, nan]), bound_tpot=np.array([0.12, nan, nan]))


def test_trace_latencies():
    tr = _trace()
    np.testing.assert_allclose(tr.ttft_s(), [0.2, 0.5, np.nan])
    np.testing.assert_allclose(tr.tpot_s(), [0.1, np.nan, np.nan])  # one-token and rejected: none


def test_per_request_ratios_match_bench_rows_by_trace_index():
    live = [{"request_id": "bench-1", "ttft_ms": 250.0, "tpot_ms": None},  # sim 500 ms, one token
            {"request_id": "warmup", "ttft_ms": 1.0, "tpot_ms": 1.0},  # not a trace request
            {"request_id": "bench-0", "ttft_ms": 100.0, "tpot_ms": 200.0},  # sim 200 ms, 100 ms/token
            {"request_id": "bench-2", "ttft_ms": 300.0, "tpot_ms": 10.0},  # rejected in the simulation
            {"request_id": "bench-7", "ttft_ms": 300.0, "tpot_ms": 10.0},  # beyond the trace
            {"request_id": "bench-x", "ttft_ms": 300.0, "tpot_ms": 10.0}]
    got = per_request_ratios(_trace(), live)
    assert got["ttft_ms"] == {"matched": 2, "ratio_p50": pytest.approx(2.0), "abs_error_p50": pytest.approx(1.0)}
    assert got["tpot_ms"] == {"matched": 1, "ratio_p50": pytest.approx(0.5), "abs_error_p50": pytest.approx(0.5)}
    assert per_request_ratios(_trace(), [])["ttft_ms"] == {"matched": 0, "ratio_p50": None, "abs_error_p50": None}
    assert got["after_queue_ms"]["matched"] == 0  # rows without the server's timings


def test_ttft_after_the_prefill_queue_separates_prefill_from_queueing():
    live = [{"request_id": "bench-0", "ttft_ms": 300.0, "queued_ms": 200.0},  # sim: 200 ms, no queue
            {"request_id": "bench-1", "ttft_ms": 500.0, "queued_ms": 0.0},  # sim: 500 ms, no queue
            {"request_id": "bench-1", "ttft_ms": None, "queued_ms": None}]  # failed
    got = per_request_ratios(_trace(), live)["after_queue_ms"]
    assert got == {"matched": 2, "ratio_p50": pytest.approx(1.5), "abs_error_p50": pytest.approx(0.5)}


def test_describe_prints_errors_and_per_request_agreement():
    result = {"target": "p50 within 15%", "live_requests": 2, "live": {}, "simulated": {}, "error": {},
              "per_request": per_request_ratios(_trace(), [{"request_id": "bench-0", "ttft_ms": 100.0,
                                                            "tpot_ms": 200.0}])}
    for key in ("ttft_ms", "tpot_ms"):
        result["simulated"][key] = {"p50": 110.0, "p90": 200.0}
        result["live"][key] = {"p50": 100.0, "p90": 200.0}
        result["error"][key] = {"p50": 0.1, "p90": 0.0}
    text = describe(result)
    assert "TTFT p50 110 ms simulated vs 100 ms live (+10.0%)" in text
    assert "sim/live median 2.00, median |error| 100% over 1" in text
    assert "after the prefill queue" not in text  # the live row has no server timings
    result["per_request"] = per_request_ratios(_trace(), [{"request_id": "bench-0", "ttft_ms": 100.0,
                                                           "queued_ms": 0.0}])
    assert "TTFT after the prefill queue (prefill + transfer + request path): per request: sim/live median 2.00" \
        in describe(result)
    assert "fidelity: no live bench" in describe({**result, "live": None})
    result["live"]["tpot_ms"], result["error"]["tpot_ms"] = {"p50": None, "p90": None}, {}  # no live TPOT at all
    assert "TPOT p50 110 ms simulated vs 0 ms live (n/a), p90 200 vs 0 (n/a)" in describe(result)


@pytest.mark.parametrize("rid", ["bench-", "bench--1", "bench-1.5"])
def test_malformed_bench_ids_are_skipped(rid):
    assert per_request_ratios(_trace(), [{"request_id": rid, "ttft_ms": 1.0}])["ttft_ms"]["matched"] == 0


def test_calibration_age_is_measured_from_the_cache_files_to_the_bench_start(tmp_path, monkeypatch):
    monkeypatch.setenv("PDO_CACHE_DIR", str(tmp_path))
    profile = tmp_path / "cpu_profile.json"
    profile.write_text("{}")
    os.utime(profile, (1000.0, 1000.0))
    assert calibration_age_s(1600.0) == {"cpu_profile": 600.0, "serving": None}  # no serving.json
    assert calibration_age_s(None) is None  # a bench file from before it recorded its start


def test_describe_warns_when_the_calibration_is_far_from_the_bench():
    result = {"target": "p50 within 15%", "live_requests": 1, "per_request": {},
              "simulated": {k: {"p50": 1.0, "p90": 1.0} for k in ("ttft_ms", "tpot_ms")},
              "live": {k: {"p50": 1.0, "p90": 1.0} for k in ("ttft_ms", "tpot_ms")},
              "error": {k: {"p50": 0.0, "p90": 0.0} for k in ("ttft_ms", "tpot_ms")}}
    recent = describe({**result, "calibration_age_s": {"cpu_profile": 90.0, "serving": -30.0}})
    assert "calibration: cpu profile 1.5 min before the live bench, serving overheads 0.5 min after" in recent
    assert "make fidelity" not in recent
    old = describe({**result, "calibration_age_s": {"cpu_profile": 3600.0, "serving": None}})
    assert "cpu profile 60.0 min before the live bench, serving overheads not measured" in old
    assert "`make fidelity` measures both right before its bench" in old
    assert "calibration" not in describe({**result, "calibration_age_s": None})
