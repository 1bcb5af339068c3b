"""The project's own timing of the OpenAI door (`/v1/completions`, streamed), for bench/loadgen.py: the third
column between the bench's gRPC client and aiperf, so a gap between those two can be put on the door
(ours over gRPC vs ours over HTTP) or on the client measuring it (ours over HTTP vs aiperf).

The same definitions as orchestrator/client/timing.py (a StreamTiming is filled in): TTFT = first
server-sent event with text - request start; TPOT = (end of stream - first) / (tokens - 1), with
the tokens the server's `usage.completion_tokens` (the door sends no event for a token without text).
"""
from __future__ import annotations

import asyncio
import json
import time

from orchestrator.client.timing import StreamTiming


def door_event(line: bytes) -> tuple[str, object] | None:
    """One line of the door's event stream: ("text", str), ("usage", completion tokens), ("done", None),
    ("error", message), or None for anything else (blank lines between events, an empty text)."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    data = line[len(b"data:"):].strip()
    if data == b"[DONE]":
        return ("done", None)
    obj = json.loads(data)
    if "error" in obj:
        return ("error", obj["error"].get("message", ""))
    if obj.get("usage"):
        return ("usage", int(obj["usage"]["completion_tokens"]))
    choices = obj.get("choices") or []
    text = choices[0].get("text") if choices else None
    return ("text", text) if text else None


async def timed_completion(session, base_url: str, model: str, prompt_ids: list[int], max_tokens: int,
                           arrival_s: float, t0: float) -> tuple[StreamTiming, str]:
    """POST one streamed completion at t0 + arrival_s (perf_counter s) through an aiohttp session;
    its timing and an error message ("" when it finished)."""
    await asyncio.sleep(max(0.0, t0 + arrival_s - time.perf_counter()))
    body = {"model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    timing = StreamTiming()
    async with session.post(f"{base_url}/completions", json=body) as resp:
        if resp.status != 200:
            return timing, f"HTTP {resp.status}: {(await resp.text())[:200]}"
        async for line in resp.content:
            ev = door_event(line)
            if ev is None:
                continue
            kind, value = ev
            if kind == "text" and timing.first is None:
                timing.first = time.perf_counter()
            elif kind == "usage":
                timing.tokens = value
            elif kind == "error":
                return timing, str(value)
            elif kind == "done":
                timing.end = time.perf_counter()
    return timing, "" if timing.end is not None else "stream ended without [DONE]"
