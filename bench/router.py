"""Decision speed of the SLA router (issue 16, item 9): microseconds per `Router("sla").place`.

    python -m bench.router [--sizes 4x4,64x64,1000x1000] [--decisions N] [--out PATH]

Llama-3.1-70B on Trn2 prefill workers (tp=64) and CS-3 decode workers (4 systems), views built
once per scenario with random queues (0-12 prompts), decode batches (0-64), free KV, tightest TPOT
targets and a few unhealthy workers; requests vary prompt and output lengths and SLA targets, so
some are placed and some rejected. Only `place` is timed (perf_counter_ns, after a warm-up): the
states' precomputation (queue plans, step times) is the cost of a state change, not of a decision.
Placed and rejected decisions are also summarised apart (a rejection computes every worker's parts
to name the reason: Router._best_effort). At small sizes the reference, `best_pair` over every
worker's exact parts, is timed beside it and must choose the same pair on every decision. Writes
bench/results/router.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import time
from pathlib import Path

from bench import RESULTS
from hardware.perf import make_deployment
from hardware.profiles import get_profile
from model.specs import get_spec
from orchestrator.core.correction import Corrections
from orchestrator.core.predictor import (DecodeState, PredictRequest, Predictor, PrefillState, best_pair,
                                         earliest_prefill, kv_arrival_s)
from orchestrator.core.queueplan import QueuedPrompt
from orchestrator.core.router import DecodeView, Placement, PrefillView, RouteRequest, Router
from orchestrator.core.sla import SLATarget

MODEL = get_spec("llama-3.1-70b")
TRN = make_deployment(MODEL, get_profile("trn2.48xlarge"), tp=64)
CS3 = make_deployment(MODEL, get_profile("cs3"), systems=4)
KV_TOKENS = 2_000_000  # KV tokens per decode worker
NOW = 1000.0  # seconds, the views' epoch
NAIVE_UP_TO = 64  # workers per pool up to which the reference is timed beside the router
WARMUP = 20
TARGETS = {"64x64": {"p50_us": 50.0, "p99_us": 500.0}, "1000x1000": {"p99_us": 2000.0}}


def scenario(n_prefill: int, n_decode: int, seed: int = 0) -> tuple[Predictor, list[PrefillView], list[DecodeView]]:
    """A predictor with per-worker corrections and the two pools' views (about 5% unhealthy)."""
    rng = random.Random(seed)
    flow = random.Random(seed + 1)  # time between steps and sequences still to come: their own stream
    corr = Corrections(0.9, window=16, min_samples=3)  # every worker warm: the router rejects on its predictions
    for i in range(n_prefill):
        for _ in range(3):
            corr.observe(f"p{i}", "prefill", rng.uniform(0.8, 1.4), 1.0)
            corr.observe(f"p{i}", "transfer", rng.uniform(0.8, 3.0), 1.0)
    for i in range(n_decode):
        for _ in range(3):
            corr.observe(f"d{i}", "decode", rng.uniform(0.8, 1.3), 1.0)
            corr.observe(f"d{i}", "tpot", 0.01 + flow.uniform(-0.0002, 0.0005), 0.01)  # seconds between steps
    prefill = []
    for i in range(n_prefill):
        queue = tuple(QueuedPrompt(rng.randint(50, 8000), NOW - rng.uniform(0.0, 1.5), rng.choice((0, 0, 1)),
                                   rng.choice((0.5, 1.0, 2.0, 5.0))) for _ in range(rng.randint(0, 12)))
        st = PrefillState(f"p{i}", TRN, 8192, 8, queue, NOW + rng.uniform(-0.2, 0.4))
        prefill.append(PrefillView(st, running_tokens=rng.randint(0, 8192), healthy=rng.random() > 0.05))
    decode = []
    for i in range(n_decode):
        batch = rng.randint(0, 64)
        ctx = batch * rng.randint(200, 16000)
        used = min(KV_TOKENS, ctx + rng.randint(0, 400_000))
        tightest = rng.choice((math.inf, rng.uniform(0.004, 0.04))) if batch else math.inf
        targets = ((tightest, 256),) if tightest < math.inf else ()  # (TPOT target, fewest steps there)
        arriving = (flow.uniform(0.0, 20.0), flow.uniform(50, 500))  # sequences still to be placed: per s, steps
        st = DecodeState(f"d{i}", CS3, batch, ctx, 64, KV_TOKENS - used, targets, arriving=arriving)
        decode.append(DecodeView(st, KV_TOKENS, 64, healthy=rng.random() > 0.05))
    return Predictor(corr), prefill, decode


def requests(n: int, seed: int = 1) -> list[RouteRequest]:
    """Chat-like to long-document prompts, short to long outputs, loose to tight targets."""
    rng = random.Random(seed)
    return [RouteRequest(f"r{i}", int(math.exp(rng.uniform(math.log(20), math.log(32000)))),
                         rng.choice((1, rng.randint(2, 64), rng.randint(64, 2000))),
                         SLATarget(rng.choice((300, 800, 1500, 3000, 8000)), rng.choice((3, 5, 8, 15, 40))))
            for i in range(n)]


def naive(pred: Predictor, req: RouteRequest, prefill: list[PrefillView], decode: list[DecodeView],
          now: float) -> tuple[str, str] | None:
    """The reference: `best_pair` over every healthy worker's exact parts (one decode deployment)."""
    need = req.prompt_tokens + req.max_tokens
    preq = PredictRequest.from_sla(req.prompt_tokens, req.max_tokens, req.sla)
    pp = [pred.prefill_part(preq, v.state, CS3, now) for v in prefill if v.healthy]
    first = earliest_prefill(preq, pp)  # the router's rule: decode parts at its KV arrival
    dp = [pred.decode_part(preq, v.state, kv_arrival_s(first)) for v in decode
          if first is not None and v.healthy and v.total_kv_tokens >= need]
    got = best_pair(preq, pp, dp) if pp and dp else None
    return None if got is None else (got[0].worker_id, got[1].worker_id)


def _timed(fn, reqs: list[RouteRequest]) -> tuple[list[float], list]:
    """Microseconds per call of fn(req) (after WARMUP calls on the first requests) and the answers."""
    for r in reqs[:WARMUP]:
        fn(r)
    us, out = [], []
    for r in reqs:
        t0 = time.perf_counter_ns()
        got = fn(r)
        us.append((time.perf_counter_ns() - t0) / 1e3)
        out.append(got)
    return us, out


def _pct(us: list[float], q: float) -> float:
    return round(statistics.quantiles(us, n=100, method="inclusive")[round(q * 100) - 1], 2) if len(us) > 1 else us[0]


def run(n_prefill: int, n_decode: int, decisions: int) -> dict:
    """One scenario's row: the router's p50/p99 microseconds (and the reference's at small sizes)."""
    pred, prefill, decode = scenario(n_prefill, n_decode)
    router, reqs = Router("sla", pred), requests(decisions)
    us, got = _timed(lambda r: router.place(r, prefill, decode, NOW), reqs)
    placed = [(g.prefill_worker, g.decode_worker) if isinstance(g, Placement) else None for g in got]
    row = {"prefill_workers": n_prefill, "decode_workers": n_decode, "decisions": decisions,
           "p50_us": _pct(us, 0.5), "p99_us": _pct(us, 0.99),
           "placed_fraction": round(sum(p is not None for p in placed) / decisions, 3)}
    for kind, want in (("placed", True), ("rejected", False)):
        mine = [u for u, p in zip(us, placed) if (p is not None) == want]
        row[f"{kind}_p50_us"], row[f"{kind}_p99_us"] = (_pct(mine, 0.5), _pct(mine, 0.99)) if mine else (None, None)
    if max(n_prefill, n_decode) <= NAIVE_UP_TO:
        ref_us, ref = _timed(lambda r: naive(pred, r, prefill, decode, NOW), reqs)
        row.update(naive_p50_us=_pct(ref_us, 0.5), naive_p99_us=_pct(ref_us, 0.99),
                   speedup_p50=round(_pct(ref_us, 0.5) / row["p50_us"], 2),
                   agree=sum(a == b for a, b in zip(placed, ref)) / decisions)
    return row


def targets(rows: list[dict]) -> dict:
    """Each issue target at a measured size: the target, the measurement and whether it is met."""
    by = {f"{r['prefill_workers']}x{r['decode_workers']}": r for r in rows}
    return {size: {k: {"target": t, "measured": by[size][k], "met": by[size][k] <= t} for k, t in ts.items()}
            for size, ts in TARGETS.items() if size in by}


def _fmt(us: float | None, width: int) -> str:
    return f"{'-' if us is None else format(us, '.1f'):>{width}}"


def print_table(rows: list[dict], met: dict) -> None:
    print(f"{'prefill x decode':>17}{'decisions':>10}{'p50 us':>10}{'p99 us':>10}{'placed':>8}{'placed p99':>12}"
          f"{'rejected p50':>14}{'naive p50':>11}{'naive p99':>11}{'speed-up':>10}{'agree':>7}")
    for r in rows:
        ref = (f"{r['naive_p50_us']:>11.1f}{r['naive_p99_us']:>11.1f}{r['speedup_p50']:>9.1f}x{r['agree']:>7.0%}"
               if "agree" in r else f"{'-':>11}{'-':>11}{'-':>10}{'-':>7}")
        print(f"{r['prefill_workers']:>8} x {r['decode_workers']:<6}{r['decisions']:>10}{r['p50_us']:>10.1f}"
              f"{r['p99_us']:>10.1f}{r['placed_fraction']:>8.0%}{_fmt(r['placed_p99_us'], 12)}"
              f"{_fmt(r['rejected_p50_us'], 14)}{ref}")
    for size, ts in met.items():
        for k, m in ts.items():
            print(f"target {size} {k} <= {m['target']:g}: {m['measured']:g} -> {'met' if m['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the scenarios, print the table and the targets, write the JSON; returns the rows."""
    ap = argparse.ArgumentParser(prog="python -m bench.router", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=lambda s: [tuple(int(n) for n in x.split("x")) for x in s.split(",")],
                    default=[(4, 4), (64, 64), (1000, 1000)], help="comma-separated PxD, e.g. 4x4,64x64")
    ap.add_argument("--decisions", type=int, help="per size (default: 2000, 300 above 64 workers a pool)")
    ap.add_argument("--out", type=Path, default=RESULTS / "router.json")
    args = ap.parse_args(argv)
    load = os.getloadavg()
    rows = [run(p, d, args.decisions or (2000 if max(p, d) <= 64 else 300)) for p, d in args.sizes]
    met = targets(rows)
    print_table(rows, met)
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "processor": platform.machine(),
               "loadavg_at_start": load, "loadavg_at_end": os.getloadavg(), "note": "shared machine: noisy"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "targets": met, "machine": machine}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
