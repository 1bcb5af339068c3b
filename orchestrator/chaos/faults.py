"""The chaos command's faults: each injected into a live deployment, and confirmed.

    decode_kill    SIGKILL of the busiest decode worker's process (Ray restarts the actor)
    decode_stall   SIGSTOP of the busiest decode worker's process, SIGCONT after `stall_s`
    prefill_kill   SIGKILL of the busiest prefill worker's process
    kv_corrupt     the next KV transfer has a payload byte flipped (kvtransfer/faults.py)
    kv_stall       ... stops sending after its first chunk, as if the link froze
    kv_truncate    ... ends its frame stream early, with no commit
    client_cancel  a client cancels a stream that has tokens and has not finished

"Busiest": the healthy worker with the most live requests of the engine (ties: seeded), once some
worker of the pool has one (the injector probes for one if none comes). A fault is
`fired` only once it is confirmed: the process is gone (or stopped, state T, for a stall), the KV
fault is reported as applied to a frame by the worker, the cancelled stream was mid-way. A fault
that could not be injected (no healthy worker, no stream to cancel) is kept with fired=False and
the reason, never counted as survived. `affected` are the requests the fault hit: those placed on
the worker at that moment, the one whose transfer carried the KV fault, the cancelled one. A KV
fault is armed on every prefill worker that answers (one restarting after a kill, once it does) and
disarmed on the others once one has applied it; while it waits for a transfer, and while no stream
is mid-way for a cancel, the injector asks the load for an extra request (`probe`), so a fault late
in the run still meets work (for a KV fault, one with a prompt longer than
router.local_prefill_max_tokens: short ones may skip the transfer).
"""
from __future__ import annotations

import asyncio
import inspect
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from orchestrator.serving.engine import request_id_of

KINDS = ("decode_kill", "decode_stall", "prefill_kill", "kv_corrupt", "kv_stall", "kv_truncate", "client_cancel")
PROCESS_KINDS = ("decode_kill", "decode_stall", "prefill_kill")
CONFIRM_S = 10.0  # how long a fault may take to show (a process to exit, an armed KV fault to meet a transfer)
PROBE_EVERY_S = 3.0  # an armed KV fault that no transfer met: another probe this often, until CONFIRM_S


@dataclass(slots=True)
class Fault:
    kind: str
    at: float = 0.0  # monotonic time it hit (a KV fault: when the worker applied it)
    worker: str = ""
    fired: bool = False
    detail: str = ""  # why it did not fire, or what it hit
    affected: tuple[str, ...] = ()  # request ids it hit
    ended: float | None = None  # monotonic time a stall's process was resumed


@dataclass
class Injector:
    """Injects faults into `dep` (a started orchestrator.serving.deployment.Deployment)."""

    dep: object
    rng: random.Random
    stall_s: float  # how long a decode_stall keeps the process stopped
    cancel_one: Callable[[], str | None]  # cancels a mid-way stream; its request id, or None if none is
    probe: Callable[[bool], None]  # sends one more request of the load; True: one whose KV must cross
    _stalls: list[asyncio.Task] = field(default_factory=list)

    async def inject(self, kind: str) -> Fault:
        fault = Fault(kind, at=time.monotonic())
        if kind in PROCESS_KINDS:
            await self._process_fault(fault)
        elif kind.startswith("kv_"):
            await self._kv_fault(fault)
        elif kind == "client_cancel":
            rid = self.cancel_one()
            if rid is None:
                self.probe(False)
                rid = await _until(self.cancel_one)
            fault.fired, fault.affected, fault.at = rid is not None, (rid,) if rid else (), time.monotonic()
            fault.detail = "" if rid else "no stream was mid-way"
        else:
            raise ValueError(f"fault: {kind!r} is not one of {', '.join(KINDS)}")
        return fault

    async def settle(self) -> None:
        """Wait for the stalls still running to resume their processes."""
        await asyncio.gather(*self._stalls)

    # -- processes ---------------------------------------------------------------------------

    def _busiest(self, pool: str) -> str | None:
        engine = self.dep.engine
        workers = [w for w in (engine.pools.decode if pool == "decode" else engine.pools.prefill)
                   if w not in engine.workers.unhealthy]
        if not workers:
            return None
        at = 1 if pool == "decode" else 0
        live = [pair[at] for pair in engine.placements().values()]
        most = max(live.count(w) for w in workers)
        return self.rng.choice(sorted(w for w in workers if live.count(w) == most))

    async def _process_fault(self, fault: Fault) -> None:
        pool = "prefill" if fault.kind == "prefill_kill" else "decode"
        at = 1 if pool == "decode" else 0
        placed = lambda: any(pair[at] for pair in self.dep.engine.placements().values())  # noqa: E731
        if not await _until(placed, 5.0):  # a process fault is meant to hit requests: wait for one
            self.probe(False)
            await _until(placed)
        worker = self._busiest(pool)
        if worker is None:
            fault.detail = f"no healthy {pool} worker"
            return
        located = await _ask(self.dep.pools.actors[worker].process.remote())
        if located is None:
            fault.detail = f"{worker} did not answer"
            return
        _, pid = located
        fault.worker = worker
        fault.affected = tuple(rid for rid, pair in self.dep.engine.placements().items() if pair[at] == worker)
        fault.at = time.monotonic()
        if fault.kind == "decode_stall":
            os.kill(pid, signal.SIGSTOP)
            fault.fired = await _until(lambda: process_state(pid) == "T")
            self._stalls.append(asyncio.get_running_loop().create_task(self._resume(fault, pid)))
        else:
            os.kill(pid, signal.SIGKILL)
            fault.fired = await _until(lambda: process_state(pid) in (None, "Z", "X"))
        fault.detail = f"pid {pid}" if fault.fired else f"pid {pid} did not {fault.kind.split('_')[1]}"

    async def _resume(self, fault: Fault, pid: int) -> None:
        await asyncio.sleep(max(0.0, fault.at + self.stall_s - time.monotonic()))
        os.kill(pid, signal.SIGCONT)
        fault.ended = time.monotonic()

    # -- KV transfers ------------------------------------------------------------------------

    async def _kv_fault(self, fault: Fault) -> None:
        """Arm every prefill worker that answers for the fault and wait until a transfer carries it.
        A worker that cannot answer yet (restarting after a kill) is armed once it can: the probe that
        should meet the fault may be placed on it. No transfer within 2 s: a probe whose KV must cross,
        and another each PROBE_EVERY_S until CONFIRM_S."""
        engine, kind = self.dep.engine, fault.kind.removeprefix("kv_")
        before: dict[str, int] = {}  # armed worker -> the fault hits it had logged before
        hit: tuple[str, str, float] | None = None

        async def applied() -> bool:
            nonlocal hit
            for w in engine.pools.prefill:
                answer = await _ask(self.dep.pools.actors[w].kv_faults.remote())
                if answer is None:
                    continue
                if w not in before:
                    if await _ask(self.dep.pools.actors[w].inject_kv_fault.remote(kind), True) is not None:
                        before[w] = len(answer[0])
                elif answer[0][before[w]:]:
                    fault.worker, hit = w, answer[0][before[w]]
                    return True
            return False

        fired = await _until(applied, 2.0)
        give_up = time.monotonic() + CONFIRM_S
        while not fired and before and time.monotonic() < give_up:
            self.probe(True)  # a prompt too long to be prefilled locally: its KV must cross
            fired = await _until(applied, min(PROBE_EVERY_S, give_up - time.monotonic()))
        await asyncio.gather(*(_ask(self.dep.pools.actors[w].clear_kv_faults.remote()) for w in before))
        if fired:
            _, key, unix = hit
            fault.fired, fault.affected = True, (request_id_of(key),)
            fault.at = time.monotonic() - (time.time() - unix)
            fault.detail = f"transfer of {key}"
        else:
            fault.detail = "armed, but no transfer met it" if before else "no prefill worker to arm"


async def _ask(call, done=None):
    """A worker call's answer (or `done` for one that returns None), None when the worker cannot answer."""
    try:
        answer = await asyncio.wait_for(call, 10.0)
    except Exception:  # RayError: dead or restarting; TimeoutError: frozen
        return None
    return done if answer is None and done is not None else answer


def process_state(pid: int) -> str | None:
    """The process's state letter from /proc (R, S, T, Z, ...), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


async def worker_pids(dep) -> dict[str, int]:
    """Worker id -> pid of every worker that answers now (one restarting after a kill is left out)."""
    located = await asyncio.gather(*(_ask(actor.process.remote()) for actor in dep.pools.actors.values()))
    return {w: where[1] for w, where in zip(dep.pools.actors, located) if where is not None}


def memory_mb(pids: dict[str, int]) -> dict[str, float]:
    """RSS in MB of the frontend (this process) and of each worker still alive under its pid."""
    out = {"frontend": rss_mb(os.getpid())}
    for w, pid in pids.items():
        mb = rss_mb(pid)
        if mb is not None:
            out[w] = mb
    return out


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MB, None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


async def _until(fn: Callable, timeout_s: float = CONFIRM_S):
    """fn()'s first truthy value (fn may be a coroutine function) within timeout_s, else its last one."""
    end = time.monotonic() + timeout_s
    while True:
        value = fn()
        if inspect.isawaitable(value):
            value = await value
        if value or time.monotonic() >= end:
            return value
        await asyncio.sleep(0.05)
