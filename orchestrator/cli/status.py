"""`status --target HOST:PORT`: what a running frontend serves and the state of each pool's workers."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from orchestrator.cli import UserError
from orchestrator.cli.remote import TARGET_HELP, add_tls_argument, open_client


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", metavar="HOST:PORT", required=True, help=TARGET_HELP)
    add_tls_argument(p)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds")
    p.add_argument("--json", action="store_true", help="print the model and server info as JSON")


def run(args) -> int:
    from orchestrator.client import ClientError
    from orchestrator.core.summary import format_table

    try:
        with open_client(args.target, args.tls_ca, args.timeout) as client:
            model, server, health = client.model_info(), client.server_info(), client.health()
    except ClientError as e:
        raise UserError(f"{args.target}: {e}") from None
    if args.json:
        print(json.dumps({"health": health, "model": asdict(model), "server": asdict(server)}, indent=1))
        return 0
    print(f"{args.target}: {health}, version {server.version}, model {model.name} ({model.n_layers} layers, "
          f"context {model.context_length}, max_tokens <= {model.max_tokens_limit})")
    print("SLA classes: " + ", ".join(f"{c.name} (TTFT {c.ttft_ms:g} ms, TPOT {c.tpot_ms:g} ms)"
                                     for c in model.sla_classes))
    rows = [[p.name, w.worker_id, w.hardware, "yes" if w.healthy else "NO", f"{w.load:.2f}", w.queued_requests,
             w.active_requests if p.name == "decode" else "-",
             f"{w.kv_blocks_free}/{w.kv_blocks_total}" if p.name == "decode" else "-"]
            for p in server.pools for w in p.workers]
    print(format_table(["pool", "worker", "hardware", "healthy", "load", "queued", "decoding", "KV blocks free"], rows))
    return 0
