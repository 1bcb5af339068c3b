"""Token chunks from the decode workers to the engine's requests: one long poll per decode worker.

The engine submits its requests to a decode worker with an owner id; `DecodeWorker.next_outputs(owner)`
returns a chunk for every one of them that has news, so a step of a batch of B costs one call to the
worker, not B. Each request reads its own chunks from an asyncio queue; when a poll fails, or the
engine declares the worker lost (`lose`: its poll unanswered too long, `quiet_s`), each queue gets a
WorkerLost instead and is dropped (the engine migrates the request).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from decode.stream import TokenChunk
from orchestrator.serving.workers import DecodeHandle, WorkerUnavailable

log = structlog.get_logger("engine")

OUTPUT_POLL_S = 0.5  # a decode worker's long poll returns at least this often (its liveness signal)


@dataclass(frozen=True, slots=True)
class WorkerLost:
    """In a request's chunk queue: its decode worker stopped answering (no more chunks will come)."""

    worker_id: str
    cause: str


class DecodeOutputs:
    """One long poll per decode worker brings every token chunk of this engine's requests on it,
    instead of one call per request per step. Each request reads its chunks from a queue."""

    def __init__(self, worker: DecodeHandle, owner: str):
        self._worker, self._owner = worker, owner
        self._queues: dict[str, asyncio.Queue[TokenChunk | WorkerLost]] = {}
        self._task: asyncio.Task | None = None
        self._asked_at: float | None = None  # monotonic time the poll call in flight was made

    def quiet_s(self, now: float) -> float:
        """How long the worker has left a poll unanswered while requests wait on it (0 when none wait):
        an answer comes at least every OUTPUT_POLL_S from a live worker."""
        if not self._queues or self._asked_at is None:
            return 0.0
        return max(0.0, now - self._asked_at)

    def lose(self, cause: str) -> int:
        """The worker is declared lost (stalled): every waiting request gets WorkerLost and is dropped,
        so whatever the worker sends later is never delivered. Returns how many were waiting."""
        lost, n = WorkerLost(self._worker.worker_id, cause), len(self._queues)
        for queue in self._queues.values():
            queue.put_nowait(lost)
        self._queues.clear()
        return n

    def subscribe(self, request_id: str) -> asyncio.Queue[TokenChunk | WorkerLost]:
        """Call before the request is submitted, so none of its chunks can arrive unclaimed."""
        queue: asyncio.Queue[TokenChunk | WorkerLost] = asyncio.Queue()
        self._queues[request_id] = queue
        if self._task is None or self._task.done():
            self._asked_at = time.monotonic()  # waiting counts from the subscription, not an old poll
            self._task = asyncio.get_running_loop().create_task(self._poll())
        return queue

    def unsubscribe(self, request_id: str) -> None:
        self._queues.pop(request_id, None)  # chunks still coming for it are dropped

    async def _poll(self) -> None:
        while self._queues:
            self._asked_at = time.monotonic()
            try:
                chunks = await self._worker.next_outputs(self._owner, OUTPUT_POLL_S)
            except Exception as e:  # the worker died: every request waiting on it learns so
                log.warning("decode output poll failed", worker=self._worker.worker_id, error=repr(e))
                self.lose(e.cause if isinstance(e, WorkerUnavailable) else type(e).__name__)
                return
            finally:
                self._asked_at = None
            for chunk in chunks:
                queue = self._queues.get(chunk.request_id)
                if queue is not None:
                    queue.put_nowait(chunk)
                    if chunk.finished:
                        del self._queues[chunk.request_id]

    async def stop(self) -> None:
        """Stop polling; returns once the poll task has ended."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
