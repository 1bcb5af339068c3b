"""Prometheus metrics of a running frontend: what became of each request, its latencies, and the
pools' state, served as text at http://<frontend host>:<metrics_port>/metrics.

The frontend records request events, among them the router's prediction against what happened (its
relative error, and how often the actual latency exceeded the bound) and its rejections by kind; worker
gauges are read from the frontend's own pool view (the one GetServerInfo returns) when Prometheus scrapes.
The HTTP endpoint runs on the frontend's asyncio loop (aiohttp), so a scrape never reads the engine's state
from another thread.
Names follow vLLM's where they mean the same thing, with the `pdorch_` prefix.
"""
from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from model.finish import FinishReason
from orchestrator.client.types import Prediction
from orchestrator.core.sla import SLATarget, sla_met
from orchestrator.serving.engine import ErrorEvent, FinalEvent
from protos.disagg.v1 import inference_pb2 as pb

PREFIX = "pdorch_"
_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ERROR_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
_POOL_NAMES = {pb.WORKER_KIND_PREFILL: "prefill", pb.WORKER_KIND_DECODE: "decode"}


class ServingMetrics:
    """One frontend's metrics, in a registry of its own (several servers can share a process)."""

    def __init__(self, pools: Callable[[], Iterable[pb.PoolInfo]] | None = None):
        """pools: returns the pools' current state at scrape time (InferenceService.pools)."""
        self.registry = r = CollectorRegistry()
        self.running = Gauge(f"{PREFIX}requests_running", "Generate streams in progress", registry=r)
        self.finished = Counter(f"{PREFIX}requests_finished", "Requests that ended with a final response",
                                ["finish_reason", "sla_class"], registry=r)
        self.failed = Counter(f"{PREFIX}requests_failed", "Requests refused or ended by an error, by gRPC status "
                              "(CANCELLED: the client went away)", ["code"], registry=r)
        self.sla_met = Counter(f"{PREFIX}requests_sla_met", "Finished requests within both their TTFT and TPOT "
                               "targets", ["sla_class"], registry=r)
        self.last_finished = Gauge(f"{PREFIX}last_request_finished_timestamp_seconds", "Unix time the last "
                                   "request ended with a final response", registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Tokens generated for finished requests",
                                         registry=r)
        self.ttft = Histogram(f"{PREFIX}time_to_first_token_seconds", "Time to first token, server side",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(f"{PREFIX}time_per_output_token_seconds", "Mean time per output token after the "
                              "first, per request", buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}e2e_request_latency_seconds", "Request latency, server side",
                             buckets=_E2E_BUCKETS, registry=r)
        self.queued = Histogram(f"{PREFIX}request_queue_time_seconds", "Time waiting for a prefill worker",
                                buckets=_PHASE_BUCKETS, registry=r)
        self.prefill = Histogram(f"{PREFIX}request_prefill_time_seconds", "Prefill time on the prefill worker",
                                 buckets=_PHASE_BUCKETS, registry=r)
        self.transfer = Histogram(f"{PREFIX}kv_transfer_tail_seconds", "KV still in flight after the prefill's "
                                  "last layer", buckets=_PHASE_BUCKETS, registry=r)
        self.ttft_error = Histogram(f"{PREFIX}prediction_error_ttft_ratio", "|predicted / actual - 1| of the "
                                    "router's TTFT point estimate", buckets=_ERROR_BUCKETS, registry=r)
        self.tpot_error = Histogram(f"{PREFIX}prediction_error_tpot_ratio", "|predicted / actual - 1| of the "
                                    "router's TPOT point estimate", buckets=_ERROR_BUCKETS, registry=r)
        self.bound_misses = Counter(f"{PREFIX}prediction_bound_misses", "Finished requests whose actual latency "
                                    "exceeded the router's bound at its quantile, by phase", ["phase"], registry=r)
        self.rejected = Counter(f"{PREFIX}requests_rejected", "Requests the router turned away, by reason kind",
                                ["reason"], registry=r)
        if pools is not None:
            r.register(_PoolCollector(pools))

    def refused(self, code: str) -> None:
        """A request refused before its stream started (validation, limits)."""
        self.failed.labels(code).inc()

    def error(self, ev: ErrorEvent) -> None:
        """A stream that ended with an error (a router rejection counts under its kind too)."""
        self.failed.labels(ev.failure.code).inc()
        if ev.rejection:
            self.rejected.labels(ev.rejection).inc()

    def final(self, ev: FinalEvent, sla: SLATarget) -> None:
        """A stream that ended with a final response; `sla` is its request's (labels: sla.sla_class)."""
        self.finished.labels(ev.finish_reason.value, sla.sla_class).inc()
        self.last_finished.set_to_current_time()
        self.prompt_tokens.inc(ev.prompt_tokens)
        self.generation_tokens.inc(ev.completion_tokens)
        if ev.finish_reason is FinishReason.ABORT:
            return  # its timings describe a cut-short request
        t = ev.timings
        self.ttft.observe(t.ttft_ms / 1e3)
        self.e2e.observe(t.e2e_ms / 1e3)
        self.queued.observe(t.queued_ms / 1e3)
        self.prefill.observe(t.prefill_ms / 1e3)
        self.transfer.observe(t.transfer_ms / 1e3)
        tpot_ms = t.mean_tpot_ms if ev.completion_tokens > 1 else None  # one token: no TPOT
        if tpot_ms is not None:
            self.tpot.observe(tpot_ms / 1e3)
        if sla_met(sla, t.ttft_ms, tpot_ms):
            self.sla_met.labels(sla.sla_class).inc()
        if ev.prediction is not None and ev.prediction.quantile > 0:  # quantile 0: the request was not predicted
            self._prediction(ev.prediction, t.ttft_ms, tpot_ms)

    def _prediction(self, p: Prediction, ttft_ms: float, tpot_ms: float | None) -> None:
        """The router's prediction against the actual TTFT and TPOT (None: the request had no TPOT)."""
        if p.ttft_ms > 0 and ttft_ms > 0:
            self.ttft_error.observe(abs(p.ttft_ms / ttft_ms - 1))
        if ttft_ms > p.ttft_bound_ms:
            self.bound_misses.labels("ttft").inc()
        if tpot_ms is None or tpot_ms <= 0:
            return
        if p.tpot_ms > 0:
            self.tpot_error.observe(abs(p.tpot_ms / tpot_ms - 1))
        if tpot_ms > p.tpot_bound_ms:
            self.bound_misses.labels("tpot").inc()


class _PoolCollector(Collector):
    """Per-worker gauges from the frontend's pool view, read at scrape time."""

    def __init__(self, pools: Callable[[], Iterable[pb.PoolInfo]]):
        self._pools = pools

    def collect(self):
        labels = ["pool", "worker"]
        healthy = GaugeMetricFamily(f"{PREFIX}worker_healthy", "1 if the worker answers, 0 if not", labels=labels)
        load = GaugeMetricFamily(f"{PREFIX}worker_load", "0 idle .. 1 saturated", labels=labels)
        queued = GaugeMetricFamily(f"{PREFIX}worker_queued_requests", "Requests waiting on the worker", labels=labels)
        active = GaugeMetricFamily(f"{PREFIX}worker_active_requests", "Sequences decoding on the worker",
                                   labels=labels)
        free = GaugeMetricFamily(f"{PREFIX}decode_kv_blocks_free", "Free KV blocks of a decode worker",
                                 labels=["worker"])
        total = GaugeMetricFamily(f"{PREFIX}decode_kv_blocks_total", "KV blocks of a decode worker",
                                  labels=["worker"])
        for pool in self._pools():
            name = _POOL_NAMES.get(pool.kind, pool.name)
            for w in pool.workers:
                healthy.add_metric([name, w.worker_id], 1.0 if w.healthy else 0.0)
                load.add_metric([name, w.worker_id], w.load)
                queued.add_metric([name, w.worker_id], w.queued_requests)
                if pool.kind == pb.WORKER_KIND_DECODE:
                    active.add_metric([name, w.worker_id], w.active_requests)
                    free.add_metric([w.worker_id], w.kv_blocks_free)
                    total.add_metric([w.worker_id], w.kv_blocks_total)
        yield from (healthy, load, queued, active, free, total)


async def start_metrics_server(metrics: ServingMetrics, host: str, port: int):
    """Serve GET /metrics on host:port (0 picks a free port). Returns (runner, bound port);
    `await runner.cleanup()` stops it."""
    from aiohttp import web
    from prometheus_client.aiohttp import make_aiohttp_handler

    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry))
    return await serve_app(app, host, port)


async def serve_app(app, host: str, port: int, **runner_options):
    """Serve the aiohttp `app` on host:port (0 picks a free port) on the running loop. Returns (runner,
    bound port); `await runner.cleanup()` stops it. OSError (after cleaning up) if it cannot listen."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None, **runner_options)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]
