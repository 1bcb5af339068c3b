"""The chaos command's overload phase: `factor` x this machine's predicted capacity for `duration_s`.

Open-loop arrivals (the trace's lengths, its arrivals rescaled to factor x the capacity the
performance model predicts on the measured `cpu` profile), every request in the default SLA class.
What must hold: a request that cannot be served is turned away at once with RESOURCE_EXHAUSTED
(client-side time to the refusal: p50/p99/max), the admitted ones keep their SLA (attainment), the
queues stay bounded (the engine's live requests, its prefill queues, the decode workers' waiting
sequences, sampled every SAMPLE_S: their maxima), and memory stays flat (RSS of the frontend and of
each worker from a quarter of the phase to its end).

The load generator runs in a process of its own (spawned, with its own gRPC client and event loop),
so the times it measures are the system's, not the lag of the frontend's loop it would otherwise
share. Its clock starts once its channel is connected (time.monotonic is system-wide on Linux, so both
processes read the same clock); the parent samples queues and memory meanwhile.
"""
from __future__ import annotations

import asyncio
import math
import multiprocessing
import time

import numpy as np

from orchestrator.chaos.faults import memory_mb, worker_pids

SAMPLE_S = 0.25
MAX_REQUESTS = 2000  # a bound on the phase's requests, whatever the machine's speed
START_TIMEOUT_S = 60.0  # for the load generator's process to import and connect
END_TIMEOUT_S = 300.0  # after the phase's last arrival, for every admitted request to end


async def overload_phase(dep, cfg, tokenizer, factor: float, duration_s: float) -> dict:
    """Run the phase against a started deployment `dep` from a load-generator process; its report."""
    from bench.live import FILLER, auto_rate, prompt_ids
    from orchestrator.core.trace import fit_trace, load_azure_trace

    wl = cfg.workload
    sla = cfg.sla_classes[cfg.default_sla_class]
    probe_rows = load_azure_trace(wl.trace, limit=200)
    capacity = auto_rate(cfg, probe_rows, 1.0)
    rate = factor * capacity
    n = min(MAX_REQUESTS, max(1, math.ceil(rate * duration_s)))
    trace, _ = fit_trace(load_azure_trace(wl.trace, limit=n), wl.max_prompt_tokens, wl.max_output_tokens, rate)
    filler = tokenizer.encode(FILLER)
    offered = [(r.arrival_s, prompt_ids(tokenizer, r.prompt_tokens, filler, i), r.output_tokens)
               for i, r in enumerate(trace)]
    print(f"overload: {n} requests at {rate:.3g} req/s ({factor:g}x the predicted {capacity:.3g}) for {duration_s:g} s")

    pids = await worker_pids(dep)
    peaks = {"live": 0, "prefill_queued": 0, "decode_waiting": 0}
    memory: dict[str, dict[str, float]] = {}

    async def sample(t0: float, done: asyncio.Future) -> None:
        while not done.done():
            for k, v in dep.engine.queue_depths().items():
                peaks[k] = max(peaks[k], v)
            if "start" not in memory and time.monotonic() - t0 >= duration_s / 4:
                memory["start"] = memory_mb(pids)
            await asyncio.wait({done}, timeout=SAMPLE_S)
        memory["end"] = memory_mb(pids)

    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=generate_load, args=(theirs, dep.target, offered, sla), daemon=True,
                       name="pdorch-overload-load")
    proc.start()
    theirs.close()
    loop = asyncio.get_running_loop()
    try:
        t0 = await asyncio.wait_for(loop.run_in_executor(None, ours.recv), START_TIMEOUT_S)
        done = loop.run_in_executor(None, ours.recv)
        await asyncio.wait_for(sample(t0, done), duration_s + END_TIMEOUT_S)
        measured = done.result()
    except (EOFError, asyncio.TimeoutError) as e:
        raise RuntimeError(f"overload: the load-generator process ended without its report ({e!r})") from e
    finally:
        proc.join(timeout=5.0)
        if proc.is_alive():
            proc.kill()
        ours.close()
    rejected_ms, admitted = measured["rejected_ms"], measured["admitted"]
    start = memory.get("start", memory["end"])
    growth = {k: memory["end"][k] - start[k] for k in start if k in memory["end"]}
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    return {
        "factor": factor, "capacity_req_s": capacity, "rate_req_s": rate, "duration_s": duration_s, "sent": n,
        "rejected": len(rejected_ms), "completed": len(admitted), "failed_by_status": measured["failed"],
        "rejection_ms_p50": pct(rejected_ms, 50), "rejection_ms_p99": pct(rejected_ms, 99),
        "rejection_ms_max": max(rejected_ms) if rejected_ms else None,
        "admitted_sla_attainment": sum(a and b for a, b in admitted) / len(admitted) if admitted else None,
        "admitted_ttft_missed": sum(not a for a, _ in admitted), "admitted_tpot_missed": sum(not b for _, b in admitted),
        "queue_peaks": peaks, "max_concurrent_requests": cfg.frontend.max_concurrent_requests,
        "rss_growth_mb": growth,
    }


def generate_load(conn, target: str, offered: list[tuple[float, list[int], int]], sla) -> None:
    """The load generator's process: sends its start (monotonic seconds, once connected), then the
    phase's measurements, over `conn`. `offered`: (arrival s from the start, prompt token ids, output tokens)."""
    asyncio.run(_offer(conn, target, offered, sla))
    conn.close()


async def _offer(conn, target: str, offered: list[tuple[float, list[int], int]], sla) -> None:
    from orchestrator.client import AsyncClient, ClientError
    from orchestrator.core.sla import tpot_met, ttft_met

    rejected_ms: list[float] = []
    admitted: list[tuple[bool, bool]] = []  # (TTFT met, TPOT met) per completed request
    failed: dict[str, int] = {}

    async def one(i: int, arrival_s: float, ids: list[int], max_tokens: int, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + arrival_s - time.monotonic()))
        sent = time.monotonic()
        first = None
        tokens = 0
        try:
            stream = client.generate(token_ids=ids, max_tokens=max_tokens, request_id=f"overload-{i}",
                                     ignore_eos=True)
            async for chunk in stream:
                if first is None and chunk.token_ids:
                    first = time.monotonic()
                tokens += len(chunk.token_ids)
            end = time.monotonic()
        except ClientError as e:
            if e.code.name == "RESOURCE_EXHAUSTED":
                rejected_ms.append((time.monotonic() - sent) * 1e3)
            else:
                failed[e.code.name] = failed.get(e.code.name, 0) + 1
            return
        tpot_ms = (end - first) * 1e3 / (tokens - 1) if first is not None and tokens > 1 else 0.0
        ttft_ms = (first - sent) * 1e3 if first is not None else math.inf
        admitted.append((ttft_met(sla, ttft_ms), tpot_met(sla, tpot_ms)))

    async with AsyncClient(target) as client:
        await client.server_info(timeout=START_TIMEOUT_S)  # connected: the clock starts now
        t0 = time.monotonic()
        conn.send(t0)
        await asyncio.gather(*(one(i, *r, t0) for i, r in enumerate(offered)))
    conn.send({"rejected_ms": rejected_ms, "admitted": admitted, "failed": failed})
