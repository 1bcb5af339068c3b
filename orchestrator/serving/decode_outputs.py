"""Token chunks from the decode workers to the engine's requests: one long poll per decode worker.

The engine submits its requests to a decode worker with an owner id; `DecodeWorker.next_outputs(owner)`
returns a chunk for every one of them that has news, so a step of a batch of B costs one call to the
worker, not B. Each request reads its own chunks from an asyncio queue; when the worker stops
answering, each queue gets a WorkerLost instead (the engine migrates the request).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from decode.stream import TokenChunk
from orchestrator.serving.workers import DecodeHandle, WorkerUnavailable

log = structlog.get_logger("engine")

OUTPUT_POLL_S = 1.0  # a decode worker's long poll returns at least this often (liveness only)


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

    def subscribe(self, request_id: str) -> asyncio.Queue[TokenChunk | WorkerLost]:
        """Call before the request is submitted, so none of its chunks can arrive unclaimed."""
        queue: asyncio.Queue[TokenChunk | WorkerLost] = asyncio.Queue()
        self._queues[request_id] = queue
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())
        return queue

    def unsubscribe(self, request_id: str) -> None:
        self._queues.pop(request_id, None)  # chunks still coming for it are dropped

    async def _poll(self) -> None:
        while self._queues:
            try:
                chunks = await self._worker.next_outputs(self._owner, OUTPUT_POLL_S)
            except Exception as e:  # the worker died: every request waiting on it learns so
                log.warning("decode output poll failed", worker=self._worker.worker_id, error=repr(e))
                lost = WorkerLost(self._worker.worker_id, e.cause if isinstance(e, WorkerUnavailable)
                                  else type(e).__name__)
                for queue in self._queues.values():
                    queue.put_nowait(lost)
                self._queues.clear()
                return
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
