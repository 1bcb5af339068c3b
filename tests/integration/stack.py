"""A real deployment for integration tests: cluster.yaml edited per test module, run on its own loop thread."""
from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import yaml

from orchestrator.core.config import Config, parse_config
from orchestrator.serving.deployment import Deployment

ROOT = Path(__file__).resolve().parents[2]


def cluster_tree() -> dict:
    """cluster.yaml as a tree, to edit before `config_of`."""
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def config_of(tree: dict, directory: Path) -> Config:
    """The edited tree written as directory/cluster.yaml (relative paths resolve from the checkout's)."""
    path = directory / "cluster.yaml"
    path.write_text(yaml.safe_dump(tree))
    return parse_config(tree, path)


class Running:
    """A started Deployment and the event loop thread it runs on."""

    def __init__(self, dep: Deployment, loop: asyncio.AbstractEventLoop):
        self.dep, self.loop = dep, loop

    def call(self, fn: Callable[[], object], timeout: float = 30.0) -> object:
        """Run fn() on the deployment's loop (its engine and router are not thread-safe) and return its result."""
        async def run():
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def ray_get(self, make_refs: Callable[[], list], timeout: float = 60.0) -> list:
        """Make Ray calls on the deployment's loop thread and wait for their results: `make_refs()`
        returns their ObjectRefs. A test's own actor calls go through the thread the engine's calls go
        through: a driver that submitted to one actor from two threads at once crashed Ray 2.60 in CI
        ("Tried to create an owned object that already exists": one task id minted twice)."""
        async def run():
            return list(await asyncio.gather(*make_refs()))
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)


@contextmanager
def running(cfg: Config, **kw) -> Iterator[Running]:
    """Deployment(cfg, port=0, metrics_port=0, http_port=0, **kw) started on a loop thread; stopped (Ray too) on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    dep = asyncio.run_coroutine_threadsafe(Deployment(cfg, **{"port": 0, "metrics_port": 0, "http_port": 0, **kw}).__aenter__(),
                                           loop).result(timeout=300)
    try:
        yield Running(dep, loop)
    finally:
        asyncio.run_coroutine_threadsafe(dep.__aexit__(None, None, None), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def kv_all_free(client) -> bool:
    """Every live decode worker's KV blocks are free, as GetServerInfo reports them (a dead worker keeps
    its last report; its KV went with its process)."""
    info = client.server_info()
    decode = [w for p in info.pools for w in p.workers if p.name == "decode" and w.healthy]
    return bool(decode) and all(w.kv_blocks_free == w.kv_blocks_total for w in decode)


def wait_kv_free(client, timeout_s=10.0) -> bool:
    """kv_all_free within timeout_s (load reports lag the workers by a refresh)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if kv_all_free(client):
            return True
        time.sleep(0.1)
    return False
