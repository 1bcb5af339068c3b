"""Summaries of a simulated run: latency percentiles, SLA attainment, SLO-miss attribution by
phase, pool utilisation, cost and energy per million output tokens.

TTFT = arrival -> first token (sampled by the prefill). TPOT = (finish - first token) / (n - 1),
so KV transfer and waiting for a decode slot count against TPOT, as in the live frontend.
A handoff refused at open for want of KV blocks (the live rule: live fails it, the simulator
retries it) is counted in `kv_refusals`; its wait after the prefill counts as decode_wait.
Each request is judged by its own targets (its class's, Trace.sla()). Prediction error is
|predicted / actual - 1| of the router's point estimate at placement, over the requests that
finished; coverage is the fraction whose actual value is within the predicted bound.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orchestrator.core.sla import SLATarget, tpot_met, ttft_met
from orchestrator.simulator.engine import SimConfig, Simulator, Trace

PHASES = ("rejected", "queueing", "prefill", "transfer", "decode_wait", "decode")


@dataclass(frozen=True, slots=True)
class PoolStats:
    name: str
    hardware: str
    units: int
    utilisation: float  # busy time / run time, mean over replicas
    mean_batch: float  # prompts per prefill batch / sequences per decode step
    kv_occupancy: float  # time-weighted mean used-block fraction (decode only)


@dataclass(frozen=True, slots=True)
class RunSummary:
    requests: int
    completed: int
    rejected: int
    duration_s: float
    rate: float  # offered requests/s
    ttft_p50_ms: float
    ttft_p90_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p90_ms: float
    tpot_p99_ms: float
    e2e_p50_s: float
    queue_p50_ms: float
    transfer_p50_ms: float
    ttft_attainment: float
    tpot_attainment: float
    sla_attainment: float  # both targets met, over all requests (rejections count as misses)
    output_tokens_per_s: float
    cost_per_m_tokens: float  # $ per million output tokens
    kwh_per_m_tokens: float
    price_per_hour: float
    pred_err_ttft_p50: float  # |predicted / actual - 1| of the router's point estimates (fractions)
    pred_err_ttft_p90: float
    pred_err_tpot_p50: float
    pred_err_tpot_p90: float
    ttft_coverage: float  # fraction of finished requests with TTFT <= the predicted bound (the quantile's target)
    tpot_coverage: float
    misses: tuple[tuple[str, int], ...]  # phase -> requests whose miss it caused
    kv_refusals: int  # handoffs refused at open for want of KV blocks (retried; their wait is decode_wait)
    local_prefills: int  # requests a decode unit prefilled itself (conditional disaggregation)
    pools: tuple[PoolStats, ...]


def _pct(x: np.ndarray, q: float, scale: float = 1.0) -> float:
    x = x[~np.isnan(x)]
    return float(np.percentile(x, q) * scale) if x.size else float("nan")


def prediction_errors(tr: Trace) -> dict[str, float]:
    """Percentiles of |predicted / actual - 1| and bound coverage over the finished requests."""
    done = ~np.isnan(tr.finish)
    ttft, tpot = tr.ttft_s()[done], tr.tpot_s()[done]
    multi = ~np.isnan(tpot) & (tpot > 0)
    e_ttft = np.abs(tr.pred_ttft[done] / ttft - 1)
    e_tpot = np.abs(tr.pred_tpot[done][multi] / tpot[multi] - 1)
    cover = lambda actual, bound: float(np.mean(actual <= bound)) if actual.size else float("nan")  # noqa: E731
    return {"ttft_p50": _pct(e_ttft, 50), "ttft_p90": _pct(e_ttft, 90), "tpot_p50": _pct(e_tpot, 50),
            "tpot_p90": _pct(e_tpot, 90), "ttft_coverage": cover(ttft, tr.bound_ttft[done]),
            "tpot_coverage": cover(tpot[multi], tr.bound_tpot[done][multi])}


def met(tr: Trace) -> np.ndarray:
    """(n,) bool: finished within both of its own targets (rejected and unfinished requests miss)."""
    sla, done = tr.sla(), ~np.isnan(tr.finish)
    return ttft_met(sla, tr.ttft_s() * 1e3) & tpot_met(sla, tr.tpot_s() * 1e3) & done


def attribute(tr: Trace, sla: SLATarget | None = None) -> np.ndarray:
    """Index into PHASES of the phase that caused each request's miss (-1: no miss); `sla`: one
    target for all (default: each request's own, Trace.sla())."""
    sla = tr.sla() if sla is None else sla
    queue = tr.prefill_start - tr.arrival
    prefill = tr.first_token - tr.prefill_start
    transfer = np.nan_to_num(tr.transfer_s())
    wait = np.nan_to_num(tr.decode_wait_s())
    n_out = np.maximum(tr.output - 1, 1)
    decode = np.nan_to_num(tr.finish - np.where(np.isnan(tr.admitted), tr.first_token, tr.admitted))
    out = np.full(tr.arrival.size, -1)
    tpot_miss = ~tpot_met(sla, tr.tpot_s() * 1e3)  # NaN for one-token requests: met; unfinished: "stuck" below
    # per-token share of each post-prefill phase; the largest takes the blame
    post = np.stack([transfer / n_out, wait / n_out, decode / n_out])
    out[tpot_miss] = 3 + np.argmax(post[:, tpot_miss], axis=0)
    # never finished (the simulation drained with the request stuck): blame the phase it is stuck in
    stuck = np.isnan(tr.finish) & ~np.isnan(tr.first_token) & (tr.output > 1)
    out[stuck] = np.where(np.isnan(tr.kv_ready[stuck]), 3, np.where(np.isnan(tr.admitted[stuck]), 4, 5))
    ttft_miss = ~ttft_met(sla, tr.ttft_s() * 1e3)
    out[ttft_miss] = np.where(queue[ttft_miss] >= prefill[ttft_miss], 1, 2)
    out[tr.rejected] = 0
    return out


def summarize(sim: Simulator, tr: Trace) -> RunSummary:
    cfg: SimConfig = sim.cfg
    n = tr.arrival.size
    ttft, tpot = tr.ttft_s(), tr.tpot_s()
    done = ~np.isnan(tr.finish)
    ok_ttft = ttft_met(tr.sla(), ttft * 1e3)
    tpot_ok = tpot_met(tr.sla(), tpot * 1e3) & done  # tpot is NaN for one-token requests (met once done)
    ok = ok_ttft & tpot_ok
    duration = max(sim.end - float(tr.arrival.min()), 1e-9)
    tokens = float(tr.output[done].sum())
    pf, dc = cfg.prefill, cfg.decode
    units = [(pf.dep, pf.replicas)] if cfg.colocated else [(pf.dep, pf.replicas), (dc.dep, dc.replicas)]
    price = sum(d.price_per_hour * r for d, r in units)
    power = sum(d.power_kw * r for d, r in units)
    hours = duration / 3600
    blame = attribute(tr)
    err = prediction_errors(tr)
    misses = tuple((p, int((blame == k).sum())) for k, p in enumerate(PHASES))
    p_busy = np.mean([u.busy_s for u in sim.prefill]) / duration
    p_batch = sum(u.batched_prompts for u in sim.prefill) / max(1, sum(u.batches for u in sim.prefill))
    d_busy = np.mean([u.busy_s for u in sim.decode]) / duration
    d_batch = sum(u.seq_steps for u in sim.decode) / max(1, sum(u.steps for u in sim.decode))
    d_kv = np.mean([u.kv_used_s for u in sim.decode]) / duration
    pools = (PoolStats("prefill", pf.dep.hw.name, pf.replicas * pf.dep.units, float(p_busy), p_batch, 0.0),
             PoolStats("decode", dc.dep.hw.name, dc.replicas * dc.dep.units, float(d_busy), d_batch, float(d_kv)))
    per_m = 1e6 / tokens if tokens else float("nan")
    return RunSummary(
        n, int(done.sum()), int(tr.rejected.sum()), duration, (n - 1) / max(np.ptp(tr.arrival), 1e-9),
        _pct(ttft, 50, 1e3), _pct(ttft, 90, 1e3), _pct(ttft, 99, 1e3),
        _pct(tpot, 50, 1e3), _pct(tpot, 90, 1e3), _pct(tpot, 99, 1e3), _pct(tr.finish - tr.arrival, 50),
        _pct(tr.prefill_start - tr.arrival, 50, 1e3), _pct(tr.transfer_s(), 50, 1e3),
        float(ok_ttft.mean()), float(tpot_ok.mean()), float(ok.mean()),
        tokens / duration, price * hours * per_m, power * hours * per_m, price,
        err["ttft_p50"], err["ttft_p90"], err["tpot_p50"], err["tpot_p90"], err["ttft_coverage"],
        err["tpot_coverage"], misses,
        sum(u.refusals for u in sim.decode), sum(u.local_prefills for u in sim.decode), pools)
