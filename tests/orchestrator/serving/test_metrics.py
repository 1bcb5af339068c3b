"""ServingMetrics: what each request event adds, the pool gauges, and the HTTP endpoint on loopback."""
from __future__ import annotations

import asyncio
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.finish import Failure, FinishReason
from orchestrator.client.types import Prediction, Timings
from orchestrator.serving.engine import ErrorEvent, FinalEvent
from orchestrator.core.sla import SLATarget
from orchestrator.serving.metrics import ServingMetrics, start_metrics_server
from protos.disagg.v1 import inference_pb2 as pb

INTERACTIVE = SLATarget(ttft_ms=500.0, tpot_ms=50.0, sla_class="interactive")
BATCH = SLATarget(ttft_ms=500.0, tpot_ms=50.0, sla_class="batch")


def _final(reason=FinishReason.LENGTH, ttft_ms=100.0, tpot_ms=20.0, tokens=10, prompt=30,
           prediction: Prediction | None = None) -> FinalEvent:
    t = Timings(queued_ms=5.0, prefill_ms=80.0, transfer_ms=2.0, ttft_ms=ttft_ms, mean_tpot_ms=tpot_ms,
                e2e_ms=ttft_ms + tpot_ms * (tokens - 1))
    return FinalEvent(reason, prompt, tokens, t, "prefill-0", "decode-0", prediction)


def _samples(metrics: ServingMetrics) -> dict[tuple[str, tuple], float]:
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_finals_count_by_reason_and_class_and_feed_the_latency_histograms():
    m = ServingMetrics()
    m.final(_final(), INTERACTIVE)
    m.final(_final(reason=FinishReason.STOP, ttft_ms=900.0), INTERACTIVE)  # misses TTFT
    m.final(_final(tpot_ms=80.0), BATCH)  # misses TPOT
    m.final(_final(tokens=1, tpot_ms=0.0), BATCH)  # one token (the engine reports TPOT 0): met
    m.final(_final(reason=FinishReason.ABORT, ttft_ms=0.0, tokens=3), BATCH)
    s = _samples(m)
    assert s[("pdorch_requests_finished_total", (("finish_reason", "length"), ("sla_class", "interactive")))] == 1
    assert s[("pdorch_requests_finished_total", (("finish_reason", "stop"), ("sla_class", "interactive")))] == 1
    assert s[("pdorch_requests_finished_total", (("finish_reason", "length"), ("sla_class", "batch")))] == 2
    assert s[("pdorch_requests_finished_total", (("finish_reason", "abort"), ("sla_class", "batch")))] == 1
    assert s[("pdorch_requests_sla_met_total", (("sla_class", "interactive"),))] == 1
    assert s[("pdorch_requests_sla_met_total", (("sla_class", "batch"),))] == 1
    assert s[("pdorch_prompt_tokens_total", ())] == 5 * 30
    assert s[("pdorch_generation_tokens_total", ())] == 10 + 10 + 10 + 1 + 3
    # the aborted request's timings stay out of the histograms; the one-token request has no TPOT
    assert s[("pdorch_time_to_first_token_seconds_count", ())] == 4
    assert s[("pdorch_time_to_first_token_seconds_sum", ())] == pytest.approx((100 + 900 + 100 + 100) / 1e3)
    assert s[("pdorch_time_per_output_token_seconds_count", ())] == 3
    assert s[("pdorch_time_to_first_token_seconds_bucket", (("le", "0.25"),))] == 3
    assert s[("pdorch_request_prefill_time_seconds_count", ())] == 4


def test_prediction_errors_and_bound_misses_by_phase():
    m = ServingMetrics()
    m.final(_final(ttft_ms=100.0, tpot_ms=20.0, prediction=Prediction(80.0, 25.0, 90.0, 30.0, 0.9)), BATCH)
    m.final(_final(ttft_ms=200.0, tpot_ms=10.0, prediction=Prediction(190.0, 10.5, 300.0, 9.0, 0.9)), BATCH)
    m.final(_final(tokens=1, tpot_ms=0.0, prediction=Prediction(100.0, 10.0, 150.0, 12.0, 0.9)), BATCH)  # no TPOT
    m.final(_final(ttft_ms=500.0, prediction=Prediction(0.0, 0.0, 0.0, 0.0, 0.0)), BATCH)  # not predicted
    m.final(_final(reason=FinishReason.ABORT, ttft_ms=999.0, prediction=Prediction(1.0, 1.0, 1.0, 1.0, 0.9)), BATCH)
    m.final(_final(), BATCH)  # no prediction at all
    s = _samples(m)
    assert s[("pdorch_prediction_error_ttft_ratio_count", ())] == 3
    assert s[("pdorch_prediction_error_ttft_ratio_sum", ())] == pytest.approx(0.2 + 0.05 + 0.0)
    assert s[("pdorch_prediction_error_ttft_ratio_bucket", (("le", "0.1"),))] == 2
    assert s[("pdorch_prediction_error_tpot_ratio_count", ())] == 2
    assert s[("pdorch_prediction_error_tpot_ratio_sum", ())] == pytest.approx(0.25 + 0.05)
    assert s[("pdorch_prediction_bound_misses_total", (("phase", "ttft"),))] == 1  # 100 > 90
    assert s[("pdorch_prediction_bound_misses_total", (("phase", "tpot"),))] == 1  # 10 > 9


def test_refusals_and_stream_errors_count_by_status_code_and_rejections_by_kind():
    m = ServingMetrics()
    m.refused("INVALID_ARGUMENT")
    m.refused("INVALID_ARGUMENT")
    m.error(ErrorEvent(Failure("UNAVAILABLE", "decode worker lost")))
    m.error(ErrorEvent(Failure("RESOURCE_EXHAUSTED", "below the floor"), "below_floor"))
    m.error(ErrorEvent(Failure("RESOURCE_EXHAUSTED", "no pair meets it"), "ttft"))
    m.error(ErrorEvent(Failure("RESOURCE_EXHAUSTED", "no pair meets it"), "ttft"))
    s = _samples(m)
    assert s[("pdorch_requests_failed_total", (("code", "INVALID_ARGUMENT"),))] == 2
    assert s[("pdorch_requests_failed_total", (("code", "UNAVAILABLE"),))] == 1
    assert s[("pdorch_requests_failed_total", (("code", "RESOURCE_EXHAUSTED"),))] == 3
    assert s[("pdorch_requests_rejected_total", (("reason", "below_floor"),))] == 1
    assert s[("pdorch_requests_rejected_total", (("reason", "ttft"),))] == 2
    assert not any(name == "pdorch_requests_rejected_total" and labels == (("reason", ""),) for name, labels in s)


def _pools() -> list[pb.PoolInfo]:
    return [pb.PoolInfo(name="prefill", kind=pb.WORKER_KIND_PREFILL, workers=[
                pb.WorkerInfo(worker_id="prefill-0", load=0.25, queued_requests=2, healthy=True)]),
            pb.PoolInfo(name="decode", kind=pb.WORKER_KIND_DECODE, workers=[
                pb.WorkerInfo(worker_id="decode-0", load=0.5, active_requests=3, kv_blocks_free=90,
                              kv_blocks_total=128, healthy=True),
                pb.WorkerInfo(worker_id="decode-1", healthy=False, kv_blocks_total=128)])]


def test_pool_gauges_are_read_at_scrape_time():
    pools = _pools()
    m = ServingMetrics(lambda: pools)
    s = _samples(m)
    assert s[("pdorch_worker_queued_requests", (("pool", "prefill"), ("worker", "prefill-0")))] == 2
    assert s[("pdorch_worker_active_requests", (("pool", "decode"), ("worker", "decode-0")))] == 3
    assert s[("pdorch_decode_kv_blocks_free", (("worker", "decode-0"),))] == 90
    assert s[("pdorch_worker_healthy", (("pool", "decode"), ("worker", "decode-1")))] == 0
    pools[1].workers[0].kv_blocks_free = 10
    assert _samples(m)[("pdorch_decode_kv_blocks_free", (("worker", "decode-0"),))] == 10


def test_endpoint_serves_the_registry_on_loopback_and_404s_elsewhere():
    m = ServingMetrics(_pools)
    m.refused("NOT_FOUND")

    async def main():
        runner, port = await start_metrics_server(m, "127.0.0.1", 0)
        try:
            def get(path):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                        return r.status, r.headers.get("Content-Type"), r.read().decode()
                except urllib.error.HTTPError as e:
                    return e.code, None, ""
            loop = asyncio.get_running_loop()
            return port, await loop.run_in_executor(None, get, "/metrics"), await loop.run_in_executor(None, get, "/")
        finally:
            await runner.cleanup()

    port, (status, ctype, body), (missing, _, _) = asyncio.run(main())
    assert port > 0 and status == 200 and ctype.startswith("text/plain")
    assert 'pdorch_requests_failed_total{code="NOT_FOUND"} 1.0' in body
    assert 'pdorch_decode_kv_blocks_total{worker="decode-1"} 128.0' in body
    assert missing == 404


def test_a_taken_port_is_refused_with_an_os_error():
    async def main():
        first, port = await start_metrics_server(ServingMetrics(), "127.0.0.1", 0)
        try:
            with pytest.raises(OSError):
                await start_metrics_server(ServingMetrics(), "127.0.0.1", port)
        finally:
            await first.cleanup()

    asyncio.run(main())
