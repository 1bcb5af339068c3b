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
    p.add_argument("--decode-hw", default="cs3")
    p.add_argument("--trace", help="Azure CSV for prompt/output lengths (default: from the config)")
    p.add_argument("--requests", type=int, default=2000, help="simulated Poisson requests per candidate")
    p.add_argument("--max-replicas", type=int, default=8)


def _trace_path(args) -> Path:
    if args.trace:
        return Path(args.trace)
    import yaml
    path = Path(args.config)
    try:
        tree = yaml.safe_load(path.read_text())
        trace = Path(tree["metadata"]["workload"]["trace"])
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found (or pass --trace)") from None
    except (KeyError, TypeError, yaml.YAMLError):
        raise UserError(f"{path}: metadata.workload.trace: missing (or pass --trace)") from None
    return trace if trace.is_absolute() else (path.parent / trace).resolve()


def run(args) -> int:
    from orchestrator.experiments import PoolSweep
    from orchestrator.request import SLATarget
    from orchestrator.sim.engine import SimConfig
    from orchestrator.sim.runner import _setup, deployment
    from orchestrator.sim.search import run_once
    from orchestrator.sim.workload import TraceError, from_trace, poisson
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
    reqs = poisson(args.rate, args.requests, [(r.prompt_tokens, r.output_tokens) for r in rows])
    sla = SLATarget(args.ttft_ms, args.tpot_ms)
    cands = sorted(((np_ * pdep.price_per_hour + nd * ddep.price_per_hour, np_, nd)
                    for np_ in range(1, args.max_replicas + 1) for nd in range(1, args.max_replicas + 1)))
    print(f"{args.model} at {args.rate:g} req/s, SLA TTFT {args.ttft_ms:g} ms / TPOT {args.tpot_ms:g} ms; "
          f"prefill replica {pdep.units} x {pdep.hw.name} (${pdep.price_per_hour:g}/h), "
          f"decode replica {ddep.units} x {ddep.hw.name} (${ddep.price_per_hour:g}/h)")
    for cost, np_, nd in cands:
        cfg = SimConfig(_setup(pdep, pool_p, np_), _setup(ddep, pool_d, nd), sla, "least_loaded")
        s = run_once(cfg, reqs)
        why = ", ".join(f"{k} {v}" for k, v in s.misses if v) or "none"
        print(f"  P{np_}:D{nd} ${cost:,.0f}/h: attainment {s.sla_attainment:.1%} "
              f"(prefill util {s.pools[0].utilisation:.0%}, decode util {s.pools[1].utilisation:.0%}; misses: {why})")
        if s.sla_attainment >= 0.9:
            print(f"cheapest: {np_} prefill + {nd} decode replicas, ${cost:,.2f}/h, "
                  f"${s.cost_per_m_tokens:.2f} per million output tokens; every cheaper candidate missed 90%")
            return 0
    raise UserError(f"no configuration up to {args.max_replicas} replicas per pool meets the SLA at {args.rate:g} req/s")
