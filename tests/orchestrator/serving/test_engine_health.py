"""Engine's view of worker health, against scripted stand-ins for the workers' `load()` calls: a failing
or hung worker is marked unhealthy and left out of routing; when it answers again it is healthy, and a
decode worker's reported KV receiver address replaces the old one (a restarted actor)."""
from __future__ import annotations

import asyncio

from decode.worker import DecodeLoad
from orchestrator.serving import engine as engine_mod
from orchestrator.serving import ledger as ledger_mod
from orchestrator.core.router import Router
from orchestrator.serving.perfmodel import live_deployment
from orchestrator.serving.engine import Engine
from orchestrator.serving.workers import DecodeHandle, Pools, PrefillHandle, WorkerUnavailable
from prefill.worker import PrefillLoad


class _Load:
    """A worker's `load()` through its handle: answers with `self.answer`, a load, an exception to raise, or "hang"."""

    def __init__(self, answer):
        self.answer = answer

    async def __call__(self, method: str):
        assert method == "load"
        if self.answer == "hang":
            await asyncio.sleep(3600)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _decode_load(port: int) -> DecodeLoad:
    return DecodeLoad(0, 0, 100, 100, 16, 0, kv_target=f"127.0.0.1:{port}")


def _engine() -> tuple[Engine, Pools, tuple[_Load, _Load, _Load]]:
    """An engine over scripted workers p0 (prefill), d0 and d1 (decode)."""
    p0, d0, d1 = _Load(PrefillLoad("p0", 0, 0)), _Load(_decode_load(1)), _Load(_decode_load(2))
    pools = Pools(prefill={"p0": PrefillHandle("p0", p0)}, decode={"d0": DecodeHandle("d0", d0), "d1": DecodeHandle("d1", d1)},
                  kv_targets={"d0": "127.0.0.1:1", "d1": "127.0.0.1:2"})
    eng = Engine(pools, Router("least_loaded"), live_deployment("smollm2-135m")[0], decode_max_batch=8)
    return eng, pools, (p0, d0, d1)


def test_failed_and_hung_workers_leave_routing_and_come_back(monkeypatch):
    monkeypatch.setattr(ledger_mod, "LOAD_TIMEOUT_S", 0.05)
    eng, pools, (p0, d0, d1) = _engine()

    async def main():
        await eng.workers.refresh_all()
        healthy_before = {v.worker_id: v.healthy for v in eng.workers.views()[1]}
        d0.answer, d1.answer = WorkerUnavailable("d0", "RayActorError"), "hang"
        await eng.workers.refresh_all()
        views_down = eng.workers.views()
        d0.answer, d1.answer = _decode_load(7), _decode_load(2)  # d0 restarted on a new port
        await eng.workers.refresh_all()
        return healthy_before, views_down, eng.workers.views()

    # without the load timeout the hung worker would stall the refresh: bounded here, so that fails
    healthy_before, (pf_down, dc_down), (pf_up, dc_up) = asyncio.run(asyncio.wait_for(main(), 10))
    assert healthy_before == {"d0": True, "d1": True}
    assert {v.worker_id: v.healthy for v in dc_down} == {"d0": False, "d1": False}  # kept, marked
    assert all(v.healthy for v in pf_down)  # the prefill worker kept answering
    assert {v.worker_id: v.healthy for v in dc_up} == {"d0": True, "d1": True} and not eng.workers.unhealthy
    assert pools.kv_targets == {"d0": "127.0.0.1:7", "d1": "127.0.0.1:2"}


def test_a_hung_worker_does_not_delay_the_other_workers_views():
    """Each worker's load is refreshed on its own: while d1's load call hangs, before its LOAD_TIMEOUT_S
    runs out and marks it unhealthy, d0's and p0's new reports reach the engine. With one gather across
    workers they could arrive only after d1's timeout."""
    eng, _, (p0, d0, d1) = _engine()

    async def main():
        await eng.start()
        try:
            d1.answer = "hang"
            await asyncio.sleep(4 * engine_mod.VIEW_REFRESH_S)  # d1's refresh is now waiting on the hang
            d0.answer, p0.answer = _decode_load(7), PrefillLoad("p0", 3, 0)
            loads = eng.workers
            while (loads.decode_loads["d0"].kv_target, loads.prefill_loads["p0"].queued_tokens) != ("127.0.0.1:7", 3):
                await asyncio.sleep(0.01)
            return set(eng.workers.unhealthy)
        finally:
            await eng.stop()

    assert asyncio.run(asyncio.wait_for(main(), 10)) == set()  # d1's timeout had not run out yet
