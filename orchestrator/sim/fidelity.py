"""fidelity-cpu: the simulator with the measured `cpu` profile against the live bench on the same
requests (the experiment's max_prompt/max_output_tokens and rate must match the bench's workload).
Reads bench/results/bench.json (written by `python -m orchestrator bench`), writes
bench/results/fidelity.json with both sides' p50/p90 TTFT and TPOT and their relative errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from orchestrator.experiments import Experiment
from orchestrator.sim.runner import points, run_point
from orchestrator.sim.workload import SimRequest

BENCH = Path("bench/results/bench.json")
OUT = Path("bench/results/fidelity.json")


def compare(exp: Experiment, reqs: list[SimRequest], bench: Path = BENCH, out: Path = OUT) -> dict:
    p = points(exp)[0]
    res = run_point(p, reqs, with_goodput=False)
    ttft, tpot = res.ttft_ms, res.tpot_ms
    sim = {"ttft_ms": {"p50": float(np.percentile(ttft, 50)), "p90": float(np.percentile(ttft, 90))},
           "tpot_ms": {"p50": float(np.percentile(tpot, 50)), "p90": float(np.percentile(tpot, 90))}}
    result: dict = {"requests": len(reqs), "simulated": sim, "live": None, "target": "p50 within 15%"}
    if bench.exists():
        live = json.loads(bench.read_text())
        result["live"] = {k: {q: live[k][q] for q in ("p50", "p90")} for k in ("ttft_ms", "tpot_ms")}
        result["live_requests"] = live.get("requests")
        result["error"] = {k: {q: sim[k][q] / live[k][q] - 1 for q in ("p50", "p90") if live[k][q]}
                           for k in ("ttft_ms", "tpot_ms")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result
