"""The chaos command's overload phase: `factor` x this machine's predicted capacity for `duration_s`.

Open-loop arrivals (the trace's lengths, its arrivals rescaled to factor x the capacity the
performance model predicts on the measured `cpu` profile), every request in the default SLA class.
What must hold: a request that cannot be served is turned away at once with RESOURCE_EXHAUSTED
(client-side time to the refusal: p50/p99/max), the admitted ones keep their SLA (attainment), the
queues stay bounded (the engine's live requests, its prefill queues, the decode workers' waiting
sequences, sampled every SAMPLE_S: their maxima), and memory stays flat (RSS of the frontend and of
each worker from a quarter of the phase to its end).
"""
from __future__ import annotations

import asyncio
import math
import time

import numpy as np

from orchestrator.chaos.faults import memory_mb, worker_pids

SAMPLE_S = 0.25
MAX_REQUESTS = 2000  # a bound on the phase's requests, whatever the machine's speed


async def overload_phase(dep, client, cfg, tokenizer, factor: float, duration_s: float) -> dict:
    """Run the phase on a started deployment `dep` through `client` (an AsyncClient); its report."""
    from bench.live import FILLER, auto_rate, prompt_ids
    from orchestrator.client import ClientError
    from orchestrator.core.sla import tpot_met, ttft_met
    from orchestrator.core.trace import fit_trace, load_azure_trace

    wl = cfg.workload
    sla = cfg.sla_classes[cfg.default_sla_class]
    probe_rows = load_azure_trace(wl.trace, limit=200)
    capacity = auto_rate(cfg, probe_rows, 1.0)
    rate = factor * capacity
    n = min(MAX_REQUESTS, max(1, math.ceil(rate * duration_s)))
    trace, _ = fit_trace(load_azure_trace(wl.trace, limit=n), wl.max_prompt_tokens, wl.max_output_tokens, rate)
    filler = tokenizer.encode(FILLER)
    print(f"overload: {n} requests at {rate:.3g} req/s ({factor:g}x the predicted {capacity:.3g}) for {duration_s:g} s")

    rejected_ms: list[float] = []
    admitted: list[tuple[bool, bool]] = []  # (TTFT met, TPOT met) per completed request
    failed: dict[str, int] = {}

    async def one(i: int, r, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + r.arrival_s - time.monotonic()))
        sent = time.monotonic()
        first = None
        tokens = 0
        try:
            stream = client.generate(token_ids=prompt_ids(tokenizer, r.prompt_tokens, filler, i),
                                     max_tokens=r.output_tokens, request_id=f"overload-{i}", ignore_eos=True)
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

    pids = await worker_pids(dep)
    peaks = {"live": 0, "prefill_queued": 0, "decode_waiting": 0}
    memory: dict[str, dict[str, float]] = {}

    async def sample(t0: float, tasks: list[asyncio.Task]) -> None:
        while not all(t.done() for t in tasks):
            for k, v in dep.engine.queue_depths().items():
                peaks[k] = max(peaks[k], v)
            at = time.monotonic() - t0
            if "start" not in memory and at >= duration_s / 4:
                memory["start"] = memory_mb(pids)
            await asyncio.sleep(SAMPLE_S)
        memory["end"] = memory_mb(pids)

    t0 = time.monotonic()
    tasks = [asyncio.create_task(one(i, r, t0)) for i, r in enumerate(trace)]
    await asyncio.gather(sample(t0, tasks), *tasks)
    start = memory.get("start", memory["end"])
    growth = {k: memory["end"][k] - start[k] for k in start if k in memory["end"]}
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    return {
        "factor": factor, "capacity_req_s": capacity, "rate_req_s": rate, "duration_s": duration_s, "sent": n,
        "rejected": len(rejected_ms), "completed": len(admitted), "failed_by_status": failed,
        "rejection_ms_p50": pct(rejected_ms, 50), "rejection_ms_p99": pct(rejected_ms, 99),
        "rejection_ms_max": max(rejected_ms) if rejected_ms else None,
        "admitted_sla_attainment": sum(a and b for a, b in admitted) / len(admitted) if admitted else None,
        "admitted_ttft_missed": sum(not a for a, _ in admitted), "admitted_tpot_missed": sum(not b for _, b in admitted),
        "queue_peaks": peaks, "max_concurrent_requests": cfg.frontend.max_concurrent_requests,
        "rss_growth_mb": growth,
    }

