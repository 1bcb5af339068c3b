"""`serve`: start the pools and the gRPC frontend from cluster.yaml and run until stopped."""
from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from orchestrator.cli import UserError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "cluster.yaml"


def add_config_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help=f"cluster.yaml with the orchestrator's settings under metadata: (default {DEFAULT_CONFIG.name})")


def load_config_or_exit(path: Path, hint: str = ""):
    """The validated config (core/config.py), or a UserError `file: key: reason` followed by `hint`."""
    from orchestrator.core.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as e:
        raise UserError(f"{e}{hint}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)
    p.add_argument("--host", default=None, help="bind address (default from the config: 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default from the config; 0 picks a free one)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="port of the Prometheus /metrics endpoint (default from the config: 9400; 0 picks a free one)")
    p.add_argument("--http-port", type=int, default=None,
                   help="port of the OpenAI-compatible HTTP door (default from the config: 8000; 0 picks a free one)")


async def _serve(cfg, host, port, metrics_port, http_port) -> None:
    from orchestrator.serving.auth import API_KEY_ENV, api_key_from_env
    from orchestrator.serving.deployment import Deployment

    api_key = api_key_from_env()
    async with Deployment(cfg, host, port, metrics_port, api_key, http_port) as dep:
        print(f"serving {cfg.model_name} on {dep.target} "
              f"({len(dep.pools.prefill)} prefill, {len(dep.pools.decode)} decode workers); Ctrl-C stops", flush=True)
        if dep.metrics_url:
            print(f"metrics: {dep.metrics_url}", flush=True)
        if dep.http_url:
            print(f"openai http: {dep.http_url}", flush=True)
        auth = f"bearer token from {API_KEY_ENV}" if api_key else f"none (set {API_KEY_ENV} to require a bearer token)"
        print(f"tls: {'on' if cfg.frontend.tls else 'off'}; auth: {auth}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C stops at once
            loop.remove_signal_handler(sig)
        print(f"draining: streams in flight get up to {cfg.frontend.shutdown_grace_s:g} s "
              "(Ctrl-C again stops now)", flush=True)


def run(args) -> int:
    from orchestrator.logging_setup import configure_logging

    configure_logging(level="INFO")
    cfg = load_config_or_exit(args.config)
    from orchestrator.core.config import is_port

    for name in ("port", "metrics_port", "http_port"):
        value = getattr(args, name)
        if value is not None and not is_port(value):
            raise UserError(f"--{name.replace('_', '-')}: must be a port in [0, 65535], got {value}")
    from orchestrator.serving.frontend import ListenError

    try:
        asyncio.run(_serve(cfg, args.host, args.port, args.metrics_port, args.http_port))
    except ListenError as e:
        raise UserError(str(e)) from None
    return 0
