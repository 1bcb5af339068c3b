"""Runs an `Experiment` (orchestrator/core/experiments.py): every sweep point, rows for the results table."""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from hardware.perf import Deployment, make_deployment
from hardware.profiles import get_profile
from model.specs import get_spec
from orchestrator.core.experiments import Experiment, PoolSweep
from orchestrator.core.sla import SLATarget
from orchestrator.core.trace import fit_trace, load_azure_trace, mean_rate
from orchestrator.simulator.engine import PoolSetup, SimConfig, Simulator, Trace
from orchestrator.simulator.report import PHASES, attribute, summarize
from orchestrator.simulator.search import goodput
from orchestrator.simulator.workload import SimRequest, from_trace, poisson, rescale


@dataclass(frozen=True, slots=True)
class Point:
    model: str
    policy: str
    mode: str  # "disagg" or "colocated"
    prefill_replicas: int
    decode_replicas: int
    rate: float | None
    cfg: SimConfig


def deployment(model: str, pool: PoolSweep) -> Deployment:
    hw = get_profile(pool.hardware)
    return make_deployment(get_spec(model), hw, pool.tp, pool.systems, hw.default_dtype, hw.default_dtype)


def _setup(dep: Deployment, pool: PoolSweep, replicas: int) -> PoolSetup:
    return PoolSetup(dep, replicas, pool.max_batch, pool.token_budget, pool.block_tokens, pool.kv_capacity_tokens)


def points(exp: Experiment) -> list[Point]:
    """The sweep's configurations (ValueError for unknown names or a model that cannot fit)."""
    out = []
    sla = SLATarget(exp.ttft_ms, exp.tpot_ms)
    for model in exp.models:
        pdep, ddep = deployment(model, exp.prefill), deployment(model, exp.decode)
        for policy, np_, nd, rate in itertools.product(exp.policies, exp.prefill.replicas, exp.decode.replicas,
                                                       exp.rates):
            cfg = SimConfig(_setup(pdep, exp.prefill, np_), _setup(ddep, exp.decode, nd), sla, policy)
            out.append(Point(model, policy, "disagg", np_, nd, rate, cfg))
        if exp.colocated_baseline:
            for policy, np_, rate in itertools.product(exp.policies, exp.prefill.replicas, exp.rates):
                colo = replace(exp.decode, max_batch=exp.decode.max_batch, kv_capacity_tokens=0)
                cfg = SimConfig(_setup(pdep, exp.prefill, np_), _setup(pdep, colo, np_), sla, policy, colocated=True)
                out.append(Point(model, policy, "colocated", np_, 0, rate, cfg))
    return out


def _native_rate(exp: Experiment, arrivals_s: list[float]) -> float:
    rate = mean_rate(arrivals_s)
    if rate is None:
        raise ValueError(f"trace: {exp.trace} has no native rate (needs two or more requests at different times)")
    return rate


def workload(exp: Experiment) -> list[SimRequest]:
    if exp.max_prompt_tokens and exp.max_output_tokens:  # the live bench's requests, exactly
        rate = next((r for r in exp.rates if r is not None), None)
        rows = load_azure_trace(exp.trace, exp.requests)
        rows, _ = fit_trace(rows, exp.max_prompt_tokens, exp.max_output_tokens,
                            rate or _native_rate(exp, [r.arrival_s for r in rows]))
        return [SimRequest(i, r.arrival_s, max(1, r.prompt_tokens), max(1, r.output_tokens))
                for i, r in enumerate(rows)]
    reqs = from_trace(exp.trace, limit=exp.requests)
    if exp.poisson:
        native = _native_rate(exp, [r.arrival_s for r in reqs])
        reqs = poisson(native, len(reqs), [(r.prompt_tokens, r.output_tokens) for r in reqs])
    return reqs


def config_key(p: Point) -> tuple:
    """A point's configuration without its rate (goodput is a property of the configuration)."""
    return (p.model, p.policy, p.mode, p.prefill_replicas, p.decode_replicas)


def label(p: Point) -> str:
    return f"{p.mode} P{p.prefill_replicas}:D{p.decode_replicas}" if p.mode == "disagg" else \
        f"colocated x{p.prefill_replicas}"


@dataclass(slots=True)
class PointResult:
    row: dict  # flat row for the CSV and the table
    ttft_ms: np.ndarray  # samples for the CDFs
    tpot_ms: np.ndarray
    trace: Trace  # per-request timestamps
    blame: np.ndarray  # index into report.PHASES per request (-1: met the SLA)


def run_point(p: Point, reqs: list[SimRequest], with_goodput: bool = False,
              goodput_reqs: list[SimRequest] | None = None) -> PointResult:
    """One sweep point: a flat row for the CSV, its TTFT/TPOT samples (ms) and per-request trace."""
    run_reqs = reqs if p.rate is None else rescale(reqs, p.rate)
    t0 = time.perf_counter()
    sim = Simulator(p.cfg)
    tr = sim.run(run_reqs)
    wall = time.perf_counter() - t0
    s = summarize(sim, tr)
    row = {"model": p.model, "policy": p.policy, "mode": p.mode, "config": label(p),
           "prefill_replicas": p.prefill_replicas, "decode_replicas": p.decode_replicas,
           "pd_ratio": p.prefill_replicas / p.decode_replicas if p.decode_replicas else float("nan"),
           "prefill_hw": p.cfg.prefill.dep.hw.name, "decode_hw": p.cfg.decode.dep.hw.name,
           "sim_wall_s": wall}
    row.update({k: v for k, v in asdict(s).items() if k not in ("misses", "pools")})
    row.update({f"miss_{k}": v for k, v in s.misses})
    for pool in s.pools:
        row.update({f"{pool.name}_units": pool.units, f"{pool.name}_util": pool.utilisation,
                    f"{pool.name}_mean_batch": pool.mean_batch})
    row["decode_kv_occupancy"] = s.pools[1].kv_occupancy
    row["units"] = s.pools[0].units + (0 if p.mode == "colocated" else s.pools[1].units)
    if with_goodput:
        row.update(config_goodput(p, goodput_reqs or reqs, units=row["units"], price=s.price_per_hour))
    ttft, tpot = tr.ttft_s() * 1e3, tr.tpot_s() * 1e3
    blame = attribute(tr)
    return PointResult(row, ttft[~np.isnan(ttft)], tpot[~np.isnan(tpot)], tr, blame)


def config_goodput(p: Point, reqs: list[SimRequest], units: int, price: float, iters: int = 6) -> dict:
    """Goodput of the point's configuration (rate-independent), per unit and per $/h."""
    g = goodput(p.cfg, reqs, lo=0.25, hi=32.0, iters=iters)
    return {"goodput_rps": g.rate, "goodput_per_unit": g.rate / units, "goodput_per_dollar_hour": g.rate / price,
            "goodput_probes": len(g.probes)}


def request_table(res: PointResult) -> dict[str, np.ndarray]:
    """Per-request phases (seconds) of one run, for results/NAME/requests.csv."""
    tr = res.trace
    return {"request": np.arange(tr.arrival.size), "arrival_s": tr.arrival, "prompt_tokens": tr.prompt,
            "output_tokens": tr.output, "rejected": tr.rejected.astype(int),
            "queueing_s": tr.prefill_start - tr.arrival, "prefill_s": tr.first_token - tr.prefill_start,
            "transfer_s": tr.transfer_s(), "decode_wait_s": tr.decode_wait_s(),
            "ttft_s": tr.ttft_s(), "tpot_s": tr.tpot_s(),
            "e2e_s": tr.finish - tr.arrival,
            "slo_miss": np.array(["" if b < 0 else PHASES[b] for b in res.blame])}
