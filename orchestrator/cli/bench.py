"""`bench`: replay the Azure conv trace through local pools over the gRPC API and report latencies (bench/live.py)."""
from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from orchestrator.cli.serve import add_config_argument, load_config_or_exit


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bench import RESULTS

    add_config_argument(p)
    p.add_argument("--requests", type=int, default=None, help="requests to replay (default: the config's workload)")
    p.add_argument("--rate", type=float, default=None, help="arrival rate in requests/s (default: the config's)")
    p.add_argument("--output", type=Path, default=RESULTS / "bench.json")
    p.add_argument("--no-samples", action="store_true", help="skip the two sample answers at the end")


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
    from bench.live import run_bench

    try:
        result = asyncio.run(run_bench(cfg, args.requests, args.rate, samples=not args.no_samples))
    except TraceError as e:
        raise UserError(str(e)) from None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.output}")
    return 0 if result["failed"] == 0 else 1
