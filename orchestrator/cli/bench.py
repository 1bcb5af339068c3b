"""`bench`: replay the Azure conv trace through local pools over the gRPC API and report latencies (bench/live.py)."""
from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from orchestrator.cli.serve import add_config_argument, load_config_or_exit


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)
    p.add_argument("--requests", type=int, default=None, help="requests to replay (default: the config's workload)")
    p.add_argument("--rate", type=float, default=None, help="arrival rate in requests/s (default: the config's)")
    p.add_argument("--output", type=Path, help="result JSON (default: bench/results/bench.json, or "
                                                "router-live.json with --compare-policies)")
    p.add_argument("--no-samples", action="store_true", help="skip the two sample answers at the end")
    p.add_argument("--compare-policies", action="store_true",
                   help="run 1 prefill + 2 decode workers and each router policy in turn on a two-class replay "
                        "(bench/policies.py)")
    p.add_argument("--rate-factor", type=float, default=1.5,
                   help="with --compare-policies: the replay rate as a multiple of the predicted capacity")


def run(args) -> int:
    from orchestrator.cli import UserError
    from orchestrator.logging_setup import configure_logging
    from orchestrator.core.trace import TraceError

    configure_logging()
    cfg = load_config_or_exit(args.config)
    if args.requests is not None and args.requests < 1:
        raise UserError(f"--requests: must be >= 1, got {args.requests}")
    if args.rate is not None and not args.rate > 0:
        raise UserError(f"--rate: must be > 0, got {args.rate}")
    from bench import RESULTS

    try:
        if args.compare_policies:
            if not args.rate_factor > 0:
                raise UserError(f"--rate-factor: must be > 0, got {args.rate_factor}")
            from bench.policies import compare

            result = asyncio.run(compare(cfg, args.requests or 60, args.rate_factor))
            failed = sum(r["failed"] for r in result["runs"])
            output = args.output or RESULTS / "router-live.json"
        else:
            from bench.live import run_bench

            result = asyncio.run(run_bench(cfg, args.requests, args.rate, samples=not args.no_samples))
            failed, output = result["failed"], args.output or RESULTS / "bench.json"
    except (TraceError, ValueError) as e:
        raise UserError(str(e)) from None
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {output}")
    return 0 if failed == 0 else 1
