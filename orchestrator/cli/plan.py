"""`plan`: the cheapest prefill/decode pool sizes that meet a TTFT/TPOT SLA at a request rate."""
from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.cli import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="cluster.yaml", help="cluster.yaml (metadata.workload.trace gives lengths)")
    p.add_argument("--model", required=True)
    p.add_argument("--rate", type=float, required=True, help="requests/s")
    p.add_argument("--ttft-ms", type=float, required=True)
    p.add_argument("--tpot-ms", type=float, required=True)
    p.add_argument("--prefill-hw", default="trn2.48xlarge")
    p.add_argument("--decode-hw", default="cs3", help="decode hardware (cs3: the newest CS-3 generation)")
    p.add_argument("--trace", help="Azure CSV for prompt/output lengths (default: from the config)")
    p.add_argument("--requests", type=int, default=5000, help="simulated Poisson requests per candidate")
    p.add_argument("--max-replicas", type=int, default=8)


def _trace_path(args) -> Path:
    """--trace, else the config's metadata.workload.trace, read and resolved by the one config loader."""
    if args.trace:
        return Path(args.trace)
    from orchestrator.cli.serve import load_config_or_exit
    return load_config_or_exit(Path(args.config), hint=" (or pass --trace)").workload.trace


def _fmt_misses(s) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(s.misses, key=lambda kv: -kv[1]) if v) or "none"


def run(args) -> int:
    import math

    import numpy as np

    from hardware.perf import kv_token_capacity, prefill_time, token_step_time
    from orchestrator.core.experiments import PoolSweep
    from orchestrator.core.sla import SLATarget
    from orchestrator.simulator.engine import SimConfig
    from orchestrator.simulator.runner import _setup, deployment
    from orchestrator.simulator.search import run_once
    from orchestrator.simulator.workload import TraceError, from_trace, poisson
    if not args.rate > 0:
        raise UserError(f"--rate: must be > 0 requests/s, got {args.rate}")
    if args.ttft_ms <= 0 or args.tpot_ms <= 0 or args.requests < 1 or args.max_replicas < 1:
        raise UserError("--ttft-ms, --tpot-ms, --requests and --max-replicas must be positive")
    try:
        rows = from_trace(_trace_path(args))
        pool_p = PoolSweep(args.prefill_hw, (1,), 8, token_budget=8192)
        pool_d = PoolSweep(args.decode_hw, (1,), 64)
        pdep, ddep = deployment(args.model, pool_p), deployment(args.model, pool_d)
    except TraceError as e:
        raise UserError(f"trace: {e}") from None
    except ValueError as e:
        raise UserError(str(e)) from None
    lengths = [(r.prompt_tokens, r.output_tokens) for r in rows]
    reqs = poisson(args.rate, args.requests, lengths)
    sla = SLATarget(args.ttft_ms, args.tpot_ms)
    prompts = np.array([a for a, _ in lengths], dtype=float)
    outputs = np.array([b for _, b in lengths], dtype=float)
    print(f"{args.model} at {args.rate:g} req/s, SLA TTFT {args.ttft_ms:g} ms / TPOT {args.tpot_ms:g} ms; "
          f"prefill replica {pdep.units} x {pdep.hw.name} (${pdep.price_per_hour:g}/h), "
          f"decode replica {ddep.units} x {ddep.hw.name} (${ddep.price_per_hour:g}/h)")
    # first-order sizing: why a pool needs at least so many replicas (the simulation then decides)
    tps = pool_p.token_budget / prefill_time(pdep, [pool_p.token_budget])
    demand = args.rate * prompts.mean()
    p_min = max(1, math.ceil(demand / tps))
    ttft_floor = prefill_time(pdep, [int(np.percentile(prompts, 90))]) * 1e3
    ctx = prompts.mean() + outputs.mean() / 2
    per_d = min(pool_d.max_batch, kv_token_capacity(ddep) / ctx)
    live = 1.0  # Little's law, fixed point: sequences in flight = rate x mean output x step time at that batch
    for _ in range(20):
        live = args.rate * outputs.mean() * token_step_time(ddep, max(1, round(min(live, per_d))),
                                                             max(1.0, min(live, per_d)) * ctx)
    d_min = max(1, math.ceil(live / per_d))
    tpot_floor = token_step_time(ddep, 1, ctx) * 1e3  # per emitted token: the generation may speculate
    print(f"workload (lengths from {len(lengths)} trace requests): mean prompt {prompts.mean():.0f}, "
          f"mean output {outputs.mean():.0f} tokens")
    print(f"prefill: {demand:,.0f} prompt tok/s needed, one replica does {tps:,.0f} tok/s at a {pool_p.token_budget}-"
          f"token batch -> >= {p_min} replica(s) (util {demand / tps / p_min:.0%}); p90 prompt alone takes "
          f"{ttft_floor:.0f} ms of the {args.ttft_ms:g} ms TTFT")
    print(f"decode: one sequence's time per token {tpot_floor:.2f} ms vs TPOT {args.tpot_ms:g} ms; "
          f"~{live:.0f} sequences in flight (rate x mean output x step time), one replica holds "
          f"{per_d:.0f} (max_batch {pool_d.max_batch}, KV {kv_token_capacity(ddep):,} tokens / {ctx:.0f} mean context) "
          f"-> >= {d_min} replica(s)")
    if tpot_floor > args.tpot_ms:
        raise UserError(f"TPOT {args.tpot_ms:g} ms is below one token of {args.model} on {ddep.hw.name} "
                        f"({tpot_floor:.2f} ms): no pool size meets it")
    cands = sorted(((np_ * pdep.price_per_hour + nd * ddep.price_per_hour, np_, nd)
                    for np_ in range(1, args.max_replicas + 1) for nd in range(1, args.max_replicas + 1)))
    tried = {}

    def sim(np_: int, nd: int):
        if (np_, nd) not in tried:
            cfg = SimConfig(_setup(pdep, pool_p, np_), _setup(ddep, pool_d, nd), sla, "least_loaded")
            tried[np_, nd] = run_once(cfg, reqs)
        return tried[np_, nd]

    print(f"simulating {args.requests} Poisson requests per candidate, cheapest first:")
    for cost, np_, nd in cands:
        s = sim(np_, nd)
        print(f"  P{np_}:D{nd} ${cost:,.0f}/h: attainment {s.sla_attainment:.1%} "
              f"(prefill util {s.pools[0].utilisation:.0%}, decode util {s.pools[1].utilisation:.0%}; "
              f"misses: {_fmt_misses(s)})")
        if s.sla_attainment >= 0.9:
            print(f"cheapest: {np_} prefill + {nd} decode replicas, ${cost:,.2f}/h, "
                  f"${s.cost_per_m_tokens:.2f} per million output tokens, TTFT p90 {s.ttft_p90_ms:.0f} ms, "
                  f"TPOT p90 {s.tpot_p90_ms:.2f} ms")
            print("why:")
            print(f"  - {len(tried) - 1} cheaper candidate(s) met the SLA for fewer than 90% of requests"
                  if len(tried) > 1 else "  - it is the cheapest candidate (1 replica per pool is the floor)")
            for name, other in (("prefill", (np_ - 1, nd)), ("decode", (np_, nd - 1))):
                if min(other) < 1:
                    print(f"  - {name}: 1 replica is the minimum")
                    continue
                o = sim(*other)
                print(f"  - one {name} replica fewer (P{other[0]}:D{other[1]}): attainment {o.sla_attainment:.1%}, "
                      f"misses {_fmt_misses(o)}")
            return 0
    raise UserError(f"no configuration up to {args.max_replicas} replicas per pool meets the SLA "
                    f"at {args.rate:g} req/s")
