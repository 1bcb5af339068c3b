"""The engine's view of its workers: one small async interface per pool and one typed failure.

A handle calls its worker's methods through a transport, `call(method, *args)`. pools.py builds
Ray transports (every RayError becomes WorkerUnavailable there); LocalCalls runs a plain worker in
this process (tests, one-process use) and counts its calls. The engine sees handles only, never Ray.
"""
from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from decode.stream import TokenChunk
from decode.worker import DecodeLoad, LocalPrefill
from model.sampling import SamplingParams
from prefill.worker import PrefillJob, PrefillLoad, PrefillResult

Call = Callable[..., Awaitable[Any]]  # call(method name, *args) -> what the worker's method returns


class WorkerUnavailable(Exception):
    """A worker did not answer a call: its process died, restarts, or cannot be reached."""

    def __init__(self, worker_id: str, cause: str):
        super().__init__(f"worker {worker_id} is unavailable ({cause})")
        self.worker_id, self.cause = worker_id, cause


class WorkerHandle:
    """Calls one worker's methods through a transport. Raises WorkerUnavailable, or the worker's own error."""

    def __init__(self, worker_id: str, call: Call):
        self.worker_id = worker_id
        self._call = call

    async def abort(self, request_id: str) -> object:
        return await self._call("abort", request_id)


class PrefillHandle(WorkerHandle):
    async def prefill(self, job: PrefillJob) -> PrefillResult:
        """Resolves once the prompt's KV is committed on the decode side, or with the Failure that stopped it."""
        return await self._call("prefill", job)

    async def load(self) -> PrefillLoad:
        return await self._call("load")

    async def ready(self) -> bool:
        return await self._call("ready")


class DecodeHandle(WorkerHandle):
    async def submit(self, request_id: str, first_token_id: int, params: SamplingParams,
                     prompt_ids: list[int] | None, owner: str, priority: int = 0) -> None:
        await self._call("submit", request_id, first_token_id, params, prompt_ids, owner, priority)

    async def prefill_local(self, request_id: str, prompt_ids: list[int], params: SamplingParams, owner: str,
                            priority: int = 0) -> LocalPrefill:
        """Prefill on the decode worker itself; resolves once the request is in its batch, or ended."""
        return await self._call("prefill_local", request_id, prompt_ids, params, owner, priority)

    async def next_outputs(self, owner: str, timeout: float) -> list[TokenChunk]:
        return await self._call("next_outputs", owner, timeout)

    async def load(self) -> DecodeLoad:
        return await self._call("load")


class LocalCalls:
    """In-process transport to a plain worker object; `calls` counts the calls by method name."""

    def __init__(self, worker: object):
        self.worker = worker
        self.calls: Counter[str] = Counter()

    async def __call__(self, method: str, *args: Any) -> Any:
        self.calls[method] += 1
        out = getattr(self.worker, method)(*args)
        return await out if inspect.isawaitable(out) else out


@dataclass
class Pools:
    prefill: dict[str, PrefillHandle] = field(default_factory=dict)
    decode: dict[str, DecodeHandle] = field(default_factory=dict)
    kv_targets: dict[str, str] = field(default_factory=dict)  # decode worker id -> where prefill sends its KV
    hardware: dict[str, str] = field(default_factory=dict)  # worker id -> hardware profile name
    actors: dict[str, object] = field(default_factory=dict)  # worker id -> its Ray actor (none in process)
