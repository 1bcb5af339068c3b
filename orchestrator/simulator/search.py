"""Goodput: the highest request rate at which >= 90% of requests meet both TTFT and TPOT targets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from orchestrator.simulator.engine import SimConfig, Simulator
from orchestrator.simulator.report import RunSummary, summarize
from orchestrator.simulator.workload import SimRequest, rescale


def run_once(cfg: SimConfig, reqs: list[SimRequest]) -> RunSummary:
    sim = Simulator(cfg)
    return summarize(sim, sim.run(reqs))


@dataclass(frozen=True, slots=True)
class Goodput:
    rate: float  # requests/s (0: even the lowest rate tried misses)
    summary: RunSummary | None  # the run at that rate
    probes: tuple[tuple[float, float], ...]  # (rate, attainment) of every run


def goodput(cfg: SimConfig, reqs: list[SimRequest], lo: float = 0.05, hi: float = 64.0, target: float = 0.9,
            iters: int = 8, on_probe: Callable[[float, float], None] | None = None,
            scan_step: float | None = None) -> Goodput:
    """The highest rate (requests/s) at which >= `target` of `reqs`, rescaled to it, meet their SLA.

    Default: geometric bisection between lo and hi (hi grows x4 while it passes), which assumes the
    attainment falls monotonically with the rate. `scan_step` (> 1): the sustained goodput instead,
    for policies whose attainment can dip and recover (an admission rule that switches modes under
    load): rates from lo up by x scan_step until the first that misses, then bisection between it and
    the last that passed, so every rate of the scan below the answer passed too."""
    if scan_step is not None and not scan_step > 1.0:
        raise ValueError(f"scan_step: must be > 1, got {scan_step}")
    probes: list[tuple[float, float]] = []
    best: tuple[float, RunSummary | None] = (0.0, None)

    def probe(rate: float) -> bool:
        nonlocal best
        s = run_once(cfg, rescale(reqs, rate))
        probes.append((rate, s.sla_attainment))
        if on_probe:
            on_probe(rate, s.sla_attainment)
        passed = s.sla_attainment >= target
        if passed and rate > best[0]:
            best = (rate, s)
        return passed

    if not probe(lo):
        return Goodput(0.0, None, tuple(probes))
    if scan_step is not None:
        hi = lo * scan_step  # the scan starts next to lo, so no rate below its first miss goes unprobed
    grow = 4.0 if scan_step is None else scan_step
    while probe(hi) and hi < 1e4:
        lo, hi = hi, hi * grow
    for _ in range(iters):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if probe(mid) else (lo, mid)
    return Goodput(best[0], best[1], tuple(probes))
