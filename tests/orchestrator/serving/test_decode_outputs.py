"""The engine's per-decode-worker output poll (one long poll for all of its requests), against a scripted
stand-in for the decode worker's `next_outputs`."""
from __future__ import annotations

import asyncio

from decode.stream import TokenChunk
from model.finish import FinishReason
from orchestrator.serving.decode_outputs import DecodeOutputs, WorkerLost
from orchestrator.serving.workers import DecodeHandle, WorkerUnavailable


class _ScriptedWorker(DecodeHandle):
    """`next_outputs(owner, timeout)` answers from a script: a list of chunks, or an exception."""

    def __init__(self, script: list):
        super().__init__("decode-0", self._answer)
        self.script, self.owners = list(script), []

    async def _answer(self, method: str, owner: str, timeout: float):
        assert method == "next_outputs"
        self.owners.append(owner)
        item = self.script.pop(0)
        await asyncio.sleep(0)
        if isinstance(item, Exception):
            raise item
        return item


def _chunk(rid: str, ids: tuple[int, ...], start: int, finished: bool = False) -> TokenChunk:
    return TokenChunk(rid, ids, tuple("x" for _ in ids), start, finished, FinishReason.LENGTH if finished else None)


def test_chunks_reach_their_requests_and_the_poll_stops_when_none_is_left():
    actor = _ScriptedWorker([
        [_chunk("a", (1,), 1), _chunk("b", (7,), 1), _chunk("gone", (9,), 3)],  # "gone": cancelled, dropped
        [_chunk("a", (2, 3), 2, finished=True)],
        [_chunk("b", (8,), 2, finished=True)],
    ])

    async def main():
        outputs = DecodeOutputs(actor, "eng-1")
        qa, qb = outputs.subscribe("a"), outputs.subscribe("b")
        a = [await qa.get(), await qa.get()]
        b = [await qb.get(), await qb.get()]
        await asyncio.wait_for(outputs._task, 5)  # ends by itself once both requests finished
        return a, b

    a, b = asyncio.run(main())
    assert [c.token_ids for c in a] == [(1,), (2, 3)] and a[-1].finished
    assert [c.token_ids for c in b] == [(7,), (8,)] and b[-1].finished
    assert actor.owners == ["eng-1"] * 3 and actor.script == []


def test_a_failed_poll_tells_every_waiting_request_its_worker_was_lost():
    actor = _ScriptedWorker([WorkerUnavailable("decode-0", "RayActorError")])

    async def main():
        outputs = DecodeOutputs(actor, "eng-2")
        queues = [outputs.subscribe(rid) for rid in ("a", "b")]
        return [await q.get() for q in queues]

    assert asyncio.run(main()) == [WorkerLost("decode-0", "RayActorError")] * 2


def test_unsubscribed_request_gets_nothing_more():
    actor = _ScriptedWorker([[_chunk("a", (1,), 1)], [_chunk("b", (5,), 1, finished=True)]])

    async def main():
        outputs = DecodeOutputs(actor, "eng-3")
        qa, qb = outputs.subscribe("a"), outputs.subscribe("b")
        first = await qa.get()
        outputs.unsubscribe("a")  # the client went away
        last = await qb.get()
        await asyncio.wait_for(outputs._task, 5)
        return first, qa.qsize(), last

    first, left, last = asyncio.run(main())
    assert first.token_ids == (1,) and left == 0 and last.finished
