"""A deployment with an API key refuses calls without it; stopping it drains: streams in flight
finish, new calls are refused."""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import yaml

from model.finish import FinishReason
from orchestrator import client as cl
from orchestrator.core.config import parse_config
from orchestrator.serving.deployment import Deployment

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
KEY = "integration-key"


def test_auth_then_stop_lets_streams_in_flight_finish_and_refuses_new_calls(tmp_path):
    tree = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    tree["metadata"]["frontend"]["shutdown_grace_s"] = 60.0
    cfg = parse_config(tree, tmp_path / "cluster.yaml")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    dep = asyncio.run_coroutine_threadsafe(
        Deployment(cfg, port=0, metrics_port=0, http_port=0, api_key=KEY).__aenter__(), loop).result(300)
    stopping = None
    try:
        with cl.Client(dep.target, timeout=30) as anonymous:
            with pytest.raises(cl.Unauthenticated, match="authorization"):
                anonymous.complete("Hello?", max_tokens=2)
            assert anonymous.health() == "SERVING"
        with cl.Client(dep.target, timeout=120, token=KEY) as c:
            stream = c.generate("Tell me a long story about the sea.", max_tokens=40, ignore_eos=True)
            chunks = iter(stream)
            got = len(next(chunks).token_ids)
            stopping = asyncio.run_coroutine_threadsafe(dep.__aexit__(None, None, None), loop)
            deadline = time.monotonic() + 10
            refused = None
            while refused is None and time.monotonic() < deadline:
                try:
                    c.complete("Hello?", max_tokens=2)
                    time.sleep(0.05)
                except cl.ClientError as e:
                    refused = e
            assert isinstance(refused, cl.Unavailable) and "shutting down" in str(refused), refused
            got += sum(len(chunk.token_ids) for chunk in chunks)
            assert got == 40 and stream.final.finish_reason is FinishReason.LENGTH
    finally:  # stopped (and Ray shut down) before the loop goes, even when the test failed
        if stopping is None:
            stopping = asyncio.run_coroutine_threadsafe(dep.__aexit__(None, None, None), loop)
        stopping.result(timeout=120)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def test_a_frontend_that_cannot_listen_stops_what_the_deployment_started(tmp_path):
    import socket

    import ray

    from orchestrator.serving.frontend import ListenError

    cfg = parse_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()), tmp_path / "cluster.yaml")
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        with pytest.raises(ListenError, match="metrics_port"):
            asyncio.run(Deployment(cfg, port=0, metrics_port=holder.getsockname()[1]).__aenter__())
    finally:
        holder.close()
    assert not ray.is_initialized()  # the pools and the Ray it started are gone, not leaked
