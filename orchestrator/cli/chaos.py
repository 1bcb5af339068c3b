"""`chaos`: run the live system under load while seeded faults kill, freeze and corrupt it (orchestrator/chaos/)."""
from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from orchestrator.cli.serve import add_config_argument, load_config_or_exit


def add_arguments(p: argparse.ArgumentParser) -> None:
    from orchestrator.chaos.faults import KINDS

    add_config_argument(p)
    p.add_argument("--requests", type=int, default=24, help="requests to replay (default 24)")
    p.add_argument("--seed", type=int, default=0, help="seeds the fault order, targets and cancels (default 0)")
    p.add_argument("--faults", default=",".join(KINDS),
                   help=f"comma-separated fault kinds, or none (default: all of {', '.join(KINDS)})")
    p.add_argument("--per-kind", type=int, default=1, help="times each fault kind is injected (default 1)")
    p.add_argument("--rate", type=float, default=None,
                   help="arrival rate in requests/s (default: half the predicted capacity of this machine)")
    p.add_argument("--overload", type=float, default=0.0, metavar="FACTOR",
                   help="then offer FACTOR x this machine's predicted capacity (e.g. 3) and report early rejection, "
                        "the admitted requests' SLA, queue peaks and memory (orchestrator/chaos/overload.py)")
    p.add_argument("--overload-s", type=float, default=60.0, help="seconds of the overload phase (default 60)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
    p.add_argument("--output", type=Path, default=None, help="also write the report here (default bench/results/chaos.json)")


def run(args) -> int:
    from orchestrator.chaos.run import run_chaos, survived
    from orchestrator.cli import UserError
    from orchestrator.core.trace import TraceError
    from orchestrator.logging_setup import configure_logging

    configure_logging()
    cfg = load_config_or_exit(args.config)
    if args.requests < 1:
        raise UserError(f"--requests: must be >= 1, got {args.requests}")
    if args.per_kind < 1:
        raise UserError(f"--per-kind: must be >= 1, got {args.per_kind}")
    if args.rate is not None and not args.rate > 0:
        raise UserError(f"--rate: must be > 0, got {args.rate}")
    kinds = tuple(k.strip() for k in args.faults.split(",") if k.strip() and k.strip() != "none")
    if args.overload < 0 or not args.overload_s > 0:
        raise UserError(f"--overload: a factor >= 0 and --overload-s > 0, got {args.overload} and {args.overload_s}")
    try:
        result = asyncio.run(run_chaos(cfg, args.requests, args.seed, kinds, args.per_kind, args.rate,
                                       args.overload, args.overload_s))
    except (TraceError, ValueError) as e:
        raise UserError(str(e)) from None
    from bench import RESULTS

    output = args.output or RESULTS / "chaos.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print_report(result)
    print(f"\nwrote {output}")
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "fault_log"}))
    return 0 if survived(result) else 1


def print_report(result: dict) -> None:
    from orchestrator.core.summary import format_table

    def fmt(v) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k} {fmt(x)}" for k, x in v.items()) or "-"
        return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    keys = ["sent", "completed", "cancelled_by_client", "failed_by_status", "lost", "duplicated_tokens",
            "missing_tokens", "token_mismatches", "leaked_kv_blocks", "leaked_prefill_tokens",
            "orphaned_kv_released", "faults",
            "faults_not_fired", "recovery_s_p50", "recovery_s_max", "ttft_p99_ms_during_faults", "rss_growth_mb"]
    print()
    width = max(map(len, keys))
    for k in keys:
        print(f"{k.ljust(width)}  {fmt(result[k])}")
    print()
    if "overload" in result:
        print("overload: " + "; ".join(f"{k} {fmt(v)}" for k, v in result["overload"].items()))
        print()
    print(format_table(["fault", "worker", "at (s)", "fired", "affected", "recovery (s)", "detail"],
                       [[f["kind"], f["worker"] or "-", f"{f['at']:.1f}", "yes" if f["fired"] else "NO",
                         len(f["affected"]), fmt(f["recovery_s"]), f["detail"]] for f in result["fault_log"]]))
