"""The chaos run: a live deployment (at least 2 prefill + 2 decode workers) under a replayed load while
seeded faults hit it, then the verdict.

Load: the config's trace, `requests` of it, lengths scaled as `bench` scales them (outputs at least
MIN_OUTPUT_TOKENS, so faults land mid-stream), at half the capacity the performance model predicts
for this machine unless `rate` is given. Even requests are greedy, odd ones seeded samples; all
ignore EOS, so each must stream exactly max_tokens tokens. Faults: each kind of `kinds`
`per_kind` times, in a seeded order, spread over the arrivals; before each process fault the
deployment is given time to have every worker healthy again (a killed actor is restarted by Ray),
so each fault meets a whole system. Extra requests the injector asks for (`probe`) use the loosest
SLA class, so the router's early rejection does not turn away the work a fault waits for.

Verdict, after every stream ended and the pools settled: tokens lost, duplicated or missing (chunk
indices and counts), mismatches against the uninterrupted in-process reference (greedy: the
exactness tests' near-tie rule; seeded: exact; a cancelled stream: its prefix), KV blocks still held
on the decode pool and prompts still held on the prefill pool, each fault's recovery (its affected
requests' first token after it), TTFT p99 of the requests that overlapped a fault, and RSS growth of
the frontend and of every worker process that lived through the run, from the first fault (the load
has warmed every process by then) to the end.
"""
from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from dataclasses import dataclass, field

import numpy as np
import structlog

from bench.live import FILLER, prompt_ids
from orchestrator.chaos.faults import KINDS, Fault, Injector, memory_mb, worker_pids
from orchestrator.chaos.overload import overload_phase

log = structlog.get_logger("chaos")

MIN_OUTPUT_TOKENS = 24
SETTLE_S = 60.0  # the longest the pools may take to release everything once the streams have ended
SECONDS_PER_FAULT = 6.0
HEALTHY_WAIT_S = 120.0  # the longest a restarted worker may take to serve again before the next process fault


@dataclass(slots=True)
class Spec:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    arrival_s: float
    seed: int | None  # None: greedy
    sla_class: str = ""  # "": the config's default


@dataclass(slots=True)
class Record:
    spec: Spec
    sent: float = 0.0  # monotonic
    chunks: list[tuple[float, int, int]] = field(default_factory=list)  # (monotonic, index, tokens)
    tokens: list[int] = field(default_factory=list)
    final: object | None = None
    status: str = ""  # the gRPC status name of an error
    cancel: bool = False  # asked to cancel (client_cancel)
    cancelled: bool = False
    lost: bool = False  # neither a final nor an error before the run's deadline
    index_error: tuple[int, int] | None = None

    @property
    def ttft_s(self) -> float | None:
        return self.chunks[0][0] - self.sent if self.chunks else None


def workload(cfg, requests: int, rate: float | None, tokenizer, faults: int) -> tuple[list[Spec], float]:
    """The requests, and their rate: `rate`, else half the predicted capacity, slowed so the arrivals
    last at least SECONDS_PER_FAULT per fault (a killed worker's restart takes seconds)."""
    from bench.live import auto_rate
    from orchestrator.core.trace import fit_trace, load_azure_trace

    wl = cfg.workload
    rows = load_azure_trace(wl.trace, limit=requests)
    rate = rate or min(0.5 * auto_rate(cfg, rows, 1.0), requests / (SECONDS_PER_FAULT * max(1, faults)))
    trace, _ = fit_trace(rows, wl.max_prompt_tokens, wl.max_output_tokens, rate)
    filler = tokenizer.encode(FILLER)
    return [Spec(f"chaos-{i}", prompt_ids(tokenizer, r.prompt_tokens, filler, i), max(MIN_OUTPUT_TOKENS, r.output_tokens),
                 r.arrival_s, None if i % 2 == 0 else 1000 + i) for i, r in enumerate(trace)], rate


def with_spare_workers(cfg):
    """The config with at least 2 workers in each pool, so every fault leaves a survivor."""
    return dataclasses.replace(cfg, prefill=dataclasses.replace(cfg.prefill, workers=max(2, cfg.prefill.workers)),
                               decode=dataclasses.replace(cfg.decode, workers=max(2, cfg.decode.workers)))


async def _stream(client, rec: Record, t0: float, deadline_s: float, inflight: dict) -> None:
    from orchestrator.client import ClientError

    spec = rec.spec
    await asyncio.sleep(max(0.0, t0 + spec.arrival_s - time.monotonic()))
    sampling = dict(temperature=0.8, top_p=0.95, seed=spec.seed) if spec.seed is not None else {}
    rec.sent = time.monotonic()
    stream = client.generate(token_ids=spec.prompt_ids, max_tokens=spec.max_tokens, request_id=spec.request_id,
                             ignore_eos=True, sla_class=spec.sla_class, **sampling)
    inflight[spec.request_id] = rec

    async def consume() -> None:
        async for chunk in stream:
            rec.chunks.append((time.monotonic(), chunk.index, len(chunk.token_ids)))
            rec.tokens.extend(chunk.token_ids)
            if rec.cancel:
                stream.cancel()
                rec.cancelled = True
                return
        rec.final = stream.final

    try:
        await asyncio.wait_for(consume(), deadline_s)
    except TimeoutError:
        rec.lost = True
        stream.cancel()
    except ClientError as e:
        rec.status = e.code.name
    except asyncio.CancelledError:
        if not rec.cancelled:
            raise
    finally:
        rec.index_error = stream.index_error
        inflight.pop(spec.request_id, None)


def _cancel_one(inflight: dict, rng: random.Random):
    def cancel() -> str | None:
        mid = sorted(rid for rid, r in inflight.items() if r.tokens and not r.cancel and r.final is None
                     and len(r.tokens) < r.spec.max_tokens - 4)
        if not mid:
            return None
        rid = rng.choice(mid)
        inflight[rid].cancel = True
        return rid
    return cancel


async def _all_healthy(dep, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if not dep.engine.workers.unhealthy:
            return True
        await asyncio.sleep(0.2)
    return not dep.engine.workers.unhealthy


async def _settle(dep, timeout_s: float) -> tuple[int, int, int]:
    """(decode KV blocks held, prefill prompt tokens held, committed KV the decode workers' orphan
    backstop had to release) once nothing is live, or at the timeout."""
    end = time.monotonic() + timeout_s
    while True:
        decode = await asyncio.gather(*(h.load() for h in dep.pools.decode.values()), return_exceptions=True)
        prefill = await asyncio.gather(*(h.load() for h in dep.pools.prefill.values()), return_exceptions=True)
        held = sum(l.total_blocks - l.free_blocks for l in decode if not isinstance(l, BaseException))
        queued = sum(l.queued_tokens for l in prefill if not isinstance(l, BaseException))
        answered = not any(isinstance(l, BaseException) for l in (*decode, *prefill))
        if (answered and held == 0 and queued == 0 and not dep.engine.placements()) or time.monotonic() > end:
            orphans = sum(l.orphans_released for l in decode if not isinstance(l, BaseException))
            return held, queued, orphans
        await asyncio.sleep(0.2)


async def run_chaos(cfg, requests: int = 24, seed: int = 0, kinds: tuple[str, ...] = KINDS, per_kind: int = 1,
                    rate: float | None = None, overload: float = 0.0, overload_s: float = 60.0) -> dict:
    """Run the load with the faults and return the report (module docstring); with `overload` > 0,
    then the overload phase (orchestrator/chaos/overload.py) on the same deployment, its report
    under "overload". No kinds: the overload phase only."""
    from model.loaded import load_model
    from orchestrator.client import AsyncClient
    from orchestrator.serving.deployment import Deployment

    unknown = sorted(set(kinds) - set(KINDS))
    if not kinds and not overload > 0:
        raise ValueError(f"faults: name at least one of {', '.join(KINDS)} (or run the overload phase)")
    if not (overload == 0 or overload > 0 and overload_s > 0):
        raise ValueError(f"overload: a factor > 0 with a duration > 0, got {overload} for {overload_s} s")
    if unknown:
        raise ValueError(f"faults: unknown kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
    rng = random.Random(seed)
    cfg = with_spare_workers(cfg)
    lm = load_model()
    plan = [k for k in kinds for _ in range(per_kind)]
    specs, rate = workload(cfg, requests, rate, lm.tokenizer, len(plan)) if plan else ([], 0.0)
    rng.shuffle(plan)
    span = max((s.arrival_s for s in specs), default=0.0)
    if plan:
        print(f"chaos: {len(specs)} requests at {rate:.3g} req/s over {span:.0f} s on {cfg.prefill.workers} prefill + "
              f"{cfg.decode.workers} decode workers; faults (seed {seed}): {', '.join(plan)}")
    records = {s.request_id: Record(s) for s in specs}
    inflight: dict[str, Record] = {}
    faults: list[Fault] = []
    async with Deployment(cfg, port=0, metrics_port=0, http_port=0) as dep:
        stall_s = dep.engine.stall_timeout_s + 1.5
        async with AsyncClient(dep.target) as client:
            await client.complete(token_ids=lm.tokenizer.encode(FILLER)[:16], max_tokens=4)  # warm the path
            # memory once the load has warmed every process: taken at the first fault
            baseline: dict = {"pids": {}, "mb": memory_mb({})}
            t0 = time.monotonic()
            deadline = span + 300.0
            streams = [asyncio.create_task(_stream(client, r, t0, deadline, inflight)) for r in records.values()]

            def probe(crossing: bool) -> None:
                base, rid = rng.choice(specs), f"chaos-probe-{len(records)}"
                spec = dataclasses.replace(base, request_id=rid, arrival_s=time.monotonic() - t0,
                                           sla_class=loosest)  # a probe is there to meet the fault, not be rejected
                if crossing and len(spec.prompt_ids) <= cfg.router_local_prefill_max_tokens:
                    spec.prompt_ids = prompt_ids(lm.tokenizer, cfg.router_local_prefill_max_tokens + 32,
                                                 lm.tokenizer.encode(FILLER), len(records))
                records[spec.request_id] = rec = Record(spec)
                streams.append(asyncio.create_task(_stream(client, rec, t0, deadline, inflight)))

            loosest = max(cfg.sla_classes, key=lambda name: cfg.sla_classes[name].ttft_ms)
            injector = Injector(dep, rng, stall_s, _cancel_one(inflight, rng), probe)

            async def schedule() -> None:
                for k, kind in enumerate(plan):
                    await asyncio.sleep(max(0.0, t0 + span * (k + 0.5) / len(plan) - time.monotonic()))
                    await injector.settle()  # every fault meets a whole system: stalls resumed, restarts done
                    await _all_healthy(dep, HEALTHY_WAIT_S)
                    waited = time.monotonic() + 10.0  # a fault is meant to meet work in flight
                    while not inflight and time.monotonic() < waited and not all(t.done() for t in streams):
                        await asyncio.sleep(0.05)
                    if k == 0:
                        pids = await worker_pids(dep)
                        baseline.update(pids=pids, mb=memory_mb(pids))
                    faults.append(await injector.inject(kind))
                    log.info("fault injected", **dataclasses.asdict(faults[-1]))
                await injector.settle()

            await schedule()
            while not all(t.done() for t in streams):  # probes may have joined
                await asyncio.gather(*streams)
            held_blocks, held_prompts, orphans = await _settle(dep, SETTLE_S)
            lived = {w: p for w, p in (await worker_pids(dep)).items() if baseline["pids"].get(w) == p}
            start, end = baseline["mb"], memory_mb(lived)  # the processes that lived through it
            worker_growth = {w: end[w] - start[w] for w in lived if w in end and w in start}
            overloaded = None
            if overload > 0:
                overloaded = await overload_phase(dep, cfg, lm.tokenizer, overload, overload_s)
                (overloaded["leaked_kv_blocks"], overloaded["leaked_prefill_tokens"],
                 overloaded["orphaned_kv_released"]) = await _settle(dep, SETTLE_S)
    mismatches = _check_tokens(lm, records.values())
    result = report(records.values(), faults, (held_blocks, held_prompts, orphans), mismatches,
                    end["frontend"] - start["frontend"] + sum(worker_growth.values()), worker_growth, rate, seed, t0)
    if overloaded is not None:
        result["overload"] = overloaded
    return result


def _check_tokens(lm, records) -> list[str]:
    """Request ids whose streamed tokens differ from the uninterrupted in-process run (module docstring)."""
    from model.generation import follows_greedy, generate, greedy_reference
    from model.sampling import SamplingParams

    bad = []
    for rec in records:
        if not rec.tokens or rec.status:
            continue
        spec = rec.spec
        if spec.seed is None:
            ref, margins = greedy_reference(lm.model, spec.prompt_ids, spec.max_tokens)
            ok = follows_greedy(rec.tokens, ref, margins)
        else:
            params = SamplingParams(max_tokens=spec.max_tokens, temperature=0.8, top_p=0.95, seed=spec.seed,
                                    ignore_eos=True)
            ref = [t.token_id for t in generate(lm.model, lm.tokenizer, spec.prompt_ids, params)]
            ok = rec.tokens == ref[:len(rec.tokens)]
        if not ok or len(rec.tokens) > len(ref):
            bad.append(spec.request_id)
    return bad


def _recovery_s(fault: Fault, records: dict) -> float | None:
    """The longest an affected request waited after the fault for its next token (or its end)."""
    waits = []
    for rid in fault.affected:
        rec = records.get(rid)
        if rec is None or rec.cancelled:
            continue
        after = [t for t, _, _ in rec.chunks if t > fault.at]
        if after:
            waits.append(after[0] - fault.at)
    return max(waits) if waits else None


def report(records, faults: list[Fault], held: tuple[int, int, int], mismatches: list[str],
           rss_growth_mb: float, worker_growth: dict, rate: float, seed: int, t0: float) -> dict:
    """The verdict as one JSON-able dict; times in fault_log are seconds from the first arrival.
    `held`: what _settle found (KV blocks, prefill tokens, orphaned KV released)."""
    held_blocks, held_prompts, orphans = held
    records = list(records)
    by_id = {r.spec.request_id: r for r in records}
    failed: dict[str, int] = {}
    for r in records:
        if r.status:
            failed[r.status] = failed.get(r.status, 0) + 1
    duplicated = missing = 0
    for r in records:
        if r.index_error is not None:
            received, index = r.index_error
            duplicated += max(0, received - index)
            missing += max(0, index - received)
        if r.final is not None:
            missing += max(0, r.spec.max_tokens - len(r.tokens))
    fired = [f for f in faults if f.fired and f.kind != "client_cancel"]
    recoveries = {id(f): _recovery_s(f, by_id) for f in fired}
    windows = [(f.at, f.at + (recoveries[id(f)] or 0.0)) for f in fired]
    during = [r.ttft_s for r in records if r.ttft_s is not None and any(
        r.sent <= end and r.sent + r.ttft_s >= start for start, end in windows)]
    rec_s = [v for v in recoveries.values() if v is not None]
    counted: dict[str, int] = {k: 0 for k in dict.fromkeys(f.kind for f in faults)}
    for f in faults:
        counted[f.kind] += f.fired
    return {
        "seed": seed, "rate_req_s": rate,
        "sent": len(records),
        "completed": sum(r.final is not None for r in records),
        "cancelled_by_client": sum(r.cancelled for r in records),
        "failed_by_status": failed,
        "lost": sum(r.lost for r in records),
        "duplicated_tokens": duplicated,
        "missing_tokens": missing,
        "token_mismatches": len(mismatches),
        "mismatched_requests": mismatches,
        "leaked_kv_blocks": held_blocks,
        "leaked_prefill_tokens": held_prompts,
        "orphaned_kv_released": orphans,
        "faults": counted,
        "faults_not_fired": {f.kind: f.detail for f in faults if not f.fired},
        "recovery_s_p50": float(np.percentile(rec_s, 50)) if rec_s else None,
        "recovery_s_max": max(rec_s) if rec_s else None,
        "ttft_p99_ms_during_faults": float(np.percentile(during, 99)) * 1e3 if during else None,
        "rss_growth_mb": rss_growth_mb,
        "worker_rss_growth_mb": worker_growth,
        "fault_log": [{**dataclasses.asdict(f), "at": f.at - t0, "ended": f.ended and f.ended - t0,
                       "recovery_s": recoveries.get(id(f))} for f in faults],
    }


def survived(result: dict) -> bool:
    """Every invariant held and every fault fired; nothing failed but by the router's early rejection
    (RESOURCE_EXHAUSTED: fewer workers, a request predicted to miss); nothing held after either phase."""
    over = result.get("overload", {})
    held = sum(over.get(k, 0) for k in ("leaked_kv_blocks", "leaked_prefill_tokens", "orphaned_kv_released"))
    return (result["lost"] == result["duplicated_tokens"] == result["missing_tokens"] == result["token_mismatches"]
            == result["leaked_kv_blocks"] == result["leaked_prefill_tokens"] == result["orphaned_kv_released"]
            == held == 0
            and not result["faults_not_fired"]
            and not set(result["failed_by_status"]) - {"RESOURCE_EXHAUSTED"}
            and not over.get("failed_by_status"))
