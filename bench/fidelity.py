"""fidelity-cpu: the simulator with the measured `cpu` profile against the live bench on the same
requests (the experiment's max_prompt/max_output_tokens and rate must match the bench's workload).
Reads bench/results/bench.json (written by `python -m orchestrator bench`), writes
bench/results/fidelity.json with both sides' p50/p90 TTFT and TPOT and their relative errors, and
each request's simulated / live ratio: with 40 requests the p50 of a queueing-bound TTFT moves
with which few requests sit near the median (live runs of the same requests gave 451-610 ms), so
the per-request ratios say more about the model than the two p50s.

This VM's speed drifts by 10-20% within an hour, so the result also records how long before the
live bench the `cpu` profile and the serving overheads were measured (`make fidelity` measures both
right before its bench)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from orchestrator.core.experiments import Experiment
from orchestrator.simulator.engine import Trace
from orchestrator.simulator.runner import points, run_point
from orchestrator.simulator.workload import SimRequest
from bench import RESULTS

DRIFT_WARN_S = 15 * 60  # calibration older than this at the bench's start: warn (see the docstring)
BENCH = RESULTS / "bench.json"
OUT = RESULTS / "fidelity.json"
LIVE_ID_PREFIX = "bench-"  # the live bench's request ids: bench-<index in the trace>


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
        result["per_request"] = per_request_ratios(res.trace, live.get("per_request", []))
        result["calibration_age_s"] = calibration_age_s(live.get("started_unix"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


def calibration_age_s(bench_started_unix: float | None) -> dict[str, float | None] | None:
    """Seconds from the last write of each cached calibration (`cpu` profile, serving overheads) to
    the live bench's start; None for a file that is missing, and overall for a bench without a start."""
    from hardware.cpu import cache_path, serving_path

    if bench_started_unix is None:
        return None
    ages: dict[str, float | None] = {}
    for name, path in (("cpu_profile", cache_path()), ("serving", serving_path())):
        try:
            ages[name] = bench_started_unix - path.stat().st_mtime
        except OSError:
            ages[name] = None
    return ages


def _after_queue_ms(row: dict) -> float | None:
    """A live row's TTFT after the prefill queue: prefill, KV transfer tail and the request path."""
    if row.get("ttft_ms") is None or row.get("queued_ms") is None:
        return None  # failed, or a bench file from before the server timings were recorded
    return row["ttft_ms"] - row["queued_ms"]


def per_request_ratios(trace: Trace, live_rows: list[dict]) -> dict:
    """Simulated / live TTFT, TPOT and TTFT after the prefill queue (`after_queue_ms`: prefill,
    transfer and request path, which separates the prefill model from queueing) of each request both
    sides served (live rows matched to the trace by their index): how many matched, the median ratio
    and the median |ratio - 1|."""
    sim = {"ttft_ms": trace.ttft_s() * 1e3, "tpot_ms": trace.tpot_s() * 1e3,  # (N,) each, NaN = none
           "after_queue_ms": (trace.first_token - trace.prefill_start) * 1e3}
    live_value = {"ttft_ms": lambda r: r.get("ttft_ms"), "tpot_ms": lambda r: r.get("tpot_ms"),
                  "after_queue_ms": _after_queue_ms}
    out: dict = {}
    for key, values in sim.items():
        ratios = []
        for row in live_rows:
            rid = str(row.get("request_id", ""))
            index = rid.removeprefix(LIVE_ID_PREFIX)
            if rid == index or not index.isdigit() or int(index) >= values.size:
                continue  # not a bench request of this trace
            s, lv = values[int(index)], live_value[key](row)
            if lv and not np.isnan(s):
                ratios.append(s / lv)
        r = np.asarray(ratios)
        out[key] = {"matched": int(r.size), "ratio_p50": float(np.median(r)) if r.size else None,
                    "abs_error_p50": float(np.median(np.abs(r - 1))) if r.size else None}
    return out


def describe(result: dict) -> str:
    """compare()'s result as a few printable lines."""
    if result["live"] is None:
        return f"fidelity: no live bench results at {BENCH} (run `python -m orchestrator bench` first)"
    lines = [f"fidelity vs the live bench ({result['live_requests']} requests), target {result['target']}:"]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")):
        s, lv, err = result["simulated"][key], result["live"][key], result["error"][key]
        pct = {q: f"{err[q]:+.1%}" if q in err else "n/a" for q in ("p50", "p90")}  # n/a: no live value
        each = _per_request(result, key)
        lines.append(f"  {name} p50 {s['p50']:.0f} ms simulated vs {lv['p50'] or 0:.0f} ms live ({pct['p50']})"
                     f", p90 {s['p90']:.0f} vs {lv['p90'] or 0:.0f} ({pct['p90']})" + (f"; {each}" if each else ""))
    after = _per_request(result, "after_queue_ms")
    if after:
        lines.append(f"  TTFT after the prefill queue (prefill + transfer + request path): {after}")
    ages = result.get("calibration_age_s")
    if ages:
        lines.append("  " + _calibration_line(ages))
    return "\n".join(lines)


def _calibration_line(ages: dict[str, float | None]) -> str:
    """When the calibration was measured relative to the live bench, with a warning when it is old."""
    def when(age: float | None) -> str:
        if age is None:
            return "not measured"
        return f"{abs(age) / 60:.1f} min {'before' if age >= 0 else 'after'} the live bench"

    line = f"calibration: cpu profile {when(ages.get('cpu_profile'))}, serving overheads {when(ages.get('serving'))}"
    known = [a for a in ages.values() if a is not None]
    if any(abs(a) > DRIFT_WARN_S for a in known):
        line += (f"; more than {DRIFT_WARN_S // 60} min apart, and this VM's speed drifts: "
                 "`make fidelity` measures both right before its bench")
    return line


def _per_request(result: dict, key: str) -> str:
    """One per_request_ratios entry as "per request: ...", or "" when no request matched."""
    per = result["per_request"].get(key)
    if not per or not per["matched"]:
        return ""
    return (f"per request: sim/live median {per['ratio_p50']:.2f}, median |error| {per['abs_error_p50']:.0%}"
            f" over {per['matched']}")
