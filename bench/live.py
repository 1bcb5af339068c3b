"""The live bench: replay the Azure conv trace through local pools over the gRPC API and report latencies.

Arrival times and prompt/output lengths come from the trace, scaled to the small model's context
and this machine (the scaling is printed). Every request goes through the real client library.
Entry point: `python -m orchestrator bench` (orchestrator/cli/bench.py); `make run` runs it.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass

SAMPLE_QUESTIONS = ("What is the capital of France? Answer in one sentence.",
                    "Give me two tips for writing clear code.")
FILLER = ("The history of computing is a story of people trying to make machines do useful work. "
          "Early mechanical calculators gave way to electronic computers, and those to the small "
          "devices we carry today. Along the way, engineers learned to share expensive hardware "
          "between many users, to split work across many machines, and to measure everything. ")


@dataclass(slots=True)
class Outcome:
    request_id: str
    prompt_tokens: int
    output_tokens: int
    ttft_ms: float | None
    tpot_ms: float | None
    e2e_ms: float | None
    met_sla: bool
    error: str = ""
    rejected: str = ""  # the router's rejection kind when it turned the request away at once (a miss, not a failure)
    # the server's own timings (GenerateResponse.final.timings), for comparing phases with the simulator
    queued_ms: float | None = None
    prefill_ms: float | None = None
    transfer_ms: float | None = None
    predicted_ttft_ms: float | None = None  # the router's point estimates when it placed the request
    predicted_tpot_ms: float | None = None
    bound_ttft_ms: float | None = None  # and its bounds at its quantile
    bound_tpot_ms: float | None = None
    prefill_worker: str = ""  # where it ran (equal to decode_worker: prefilled locally by the decode worker)
    decode_worker: str = ""


def prompt_ids(tokenizer, n_tokens: int, filler_ids: list[int], index: int) -> list[int]:
    """A chat prompt of exactly n_tokens tokens (raw filler text when n is below the template's size)."""
    from model.tokenizer import ChatMessage

    head = tokenizer.chat_ids([ChatMessage("user", f"Request {index}. Summarise:")])
    if n_tokens <= len(head) + 8:
        return (filler_ids * (n_tokens // len(filler_ids) + 1))[:n_tokens]
    body = (filler_ids * (n_tokens // len(filler_ids) + 1))[: n_tokens - len(head)]
    # the body ends the user's message, before its closing <|im_end|>; found, not counted from the end: "assistant"
    # is two tokens, a fixed offset split it, and the model then often answered <|im_end|> (no text) at once
    cut = max(i for i, t in enumerate(head) if t in tokenizer.stop_token_ids)
    return head[:cut] + body + head[cut:]


async def _one(client, rid: str, ids: list[int], max_tokens: int, sla, arrival: float, t0: float,
               sla_class: str = "") -> Outcome:
    from orchestrator.client.timing import StreamTiming
    from orchestrator.core.sla import sla_met

    await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
    timing = StreamTiming()
    try:
        # the trace fixes each output length: generate that many tokens, EOS or not (vLLM's ignore_eos)
        await timing.consume(client.generate(token_ids=ids, max_tokens=max_tokens, request_id=rid, ignore_eos=True,
                                             sla_class=sla_class))
    except Exception as e:  # a failed request is reported, not fatal to the bench
        return Outcome(rid, len(ids), timing.tokens, None, None, None, False, f"{type(e).__name__}: {e}",
                       getattr(e, "reason", ""))
    ttft, tpot = _ms(timing.ttft_s), _ms(timing.tpot_s)
    t, p = timing.final.timings, timing.final.prediction
    return Outcome(rid, len(ids), timing.tokens, ttft, tpot, _ms(timing.e2e_s), sla_met(sla, ttft, tpot),
                   queued_ms=t.queued_ms, prefill_ms=t.prefill_ms, transfer_ms=t.transfer_ms,
                   predicted_ttft_ms=p.ttft_ms if p else None, predicted_tpot_ms=p.tpot_ms if p else None,
                   bound_ttft_ms=p.ttft_bound_ms if p else None, bound_tpot_ms=p.tpot_bound_ms if p else None,
                   prefill_worker=timing.final.prefill_worker, decode_worker=timing.final.decode_worker)


def auto_rate(cfg, rows, fraction: float | None = None) -> float:
    """`fraction` (default: workload.capacity_fraction) x the capacity the performance model predicts for
    the config's live pools on this host's measured `cpu` profile (measured first when absent, ~30 s); printed."""
    from bench.cpu_profile import ensure_measured
    from orchestrator.core.trace import fit_trace
    from orchestrator.serving.perfmodel import live_deployment
    from orchestrator.simulator.capacity import capacity
    from orchestrator.simulator.engine import PoolSetup

    ensure_measured()
    wl, pf, dc = cfg.workload, cfg.prefill, cfg.decode
    dep, _ = live_deployment(cfg.model_name)
    fitted, _ = fit_trace(rows, wl.max_prompt_tokens, wl.max_output_tokens, 1.0)  # the lengths only
    cap = capacity(PoolSetup(dep, pf.workers, pf.max_batch, pf.token_budget),
                   PoolSetup(dep, dc.workers, dc.max_batch, block_tokens=dc.block_tokens,
                             kv_capacity_tokens=dc.kv_capacity_tokens),
                   [(max(1, r.prompt_tokens), max(1, r.output_tokens)) for r in fitted], shared_host=True)
    fraction = wl.capacity_fraction if fraction is None else fraction
    rate = fraction * cap.rps
    print(f"{cap.describe()} on this host's cpu profile: replaying at {fraction:g}x = {rate:.3g} req/s")
    return rate


def prediction_error(outcomes: list[Outcome]) -> dict[str, float | None]:
    """p50 and p90 of |predicted / actual - 1| for TTFT and TPOT over the completed requests, and the
    fraction of them within the router's bound (its coverage, the quantile's target)."""
    import numpy as np

    out = {}
    for name, rows in (("ttft", [(o.predicted_ttft_ms, o.bound_ttft_ms, o.ttft_ms) for o in outcomes]),
                       ("tpot", [(o.predicted_tpot_ms, o.bound_tpot_ms, o.tpot_ms) for o in outcomes])):
        rows = [(p, b, a) for p, b, a in rows if p and a]
        err = [abs(p / a - 1) for p, _, a in rows]
        out.update({f"{name}_p50": float(np.percentile(err, 50)) if err else None,
                    f"{name}_p90": float(np.percentile(err, 90)) if err else None,
                    f"{name}_coverage": sum(a <= b for _, b, a in rows) / len(rows) if rows else None})
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


async def run_bench(cfg, requests: int | None = None, rate: float | None = None,
                    samples: bool = True) -> dict:
    """Replay the config's workload (or `requests` of it at `rate`) through a local deployment; the result JSON."""
    from tqdm import tqdm

    from model.loaded import load_model
    from orchestrator.client import AsyncClient
    from orchestrator.serving.deployment import Deployment
    from orchestrator.core.summary import Summary, format_table
    from orchestrator.core.trace import fit_trace, load_azure_trace

    wl = cfg.workload
    n_req = requests or wl.requests
    rows = load_azure_trace(wl.trace, limit=n_req)
    rate = rate or wl.target_rate or auto_rate(cfg, rows)
    trace, scaling = fit_trace(rows, wl.max_prompt_tokens, wl.max_output_tokens, rate)
    print(f"trace: {wl.trace.name}, {len(trace)} requests; scaled: {scaling.describe()}")
    tok = load_model().tokenizer
    filler = tok.encode(FILLER)
    sla = cfg.sla_classes[cfg.default_sla_class]
    async with Deployment(cfg, port=0, metrics_port=0, http_port=0) as dep:
        print(f"pools: {len(dep.pools.prefill)} prefill x {cfg.prefill.hardware}, "
              f"{len(dep.pools.decode)} decode x {cfg.decode.hardware}; frontend {dep.target}")
        async with AsyncClient(dep.target) as client:
            await _one(client, "warmup", prompt_ids(tok, 16, filler, 0), 4, sla, 0.0, time.perf_counter())
            started_unix, t0 = time.time(), time.perf_counter()
            tasks = [asyncio.create_task(_one(client, f"bench-{i}", prompt_ids(tok, r.prompt_tokens, filler, i),
                                              r.output_tokens, sla, r.arrival_s, t0)) for i, r in enumerate(trace)]
            outcomes = []
            with tqdm(total=len(tasks), desc="requests", unit="req") as bar:
                for fut in asyncio.as_completed(tasks):
                    outcomes.append(await fut)
                    bar.update(1)
            wall = time.perf_counter() - t0
            samples = []
            if samples:
                for q in SAMPLE_QUESTIONS:
                    c = await client.complete(messages=[("user", q)], max_tokens=48)
                    samples.append((q, c.text))
    ok = [o for o in outcomes if not o.error]
    rejected = [o for o in outcomes if o.rejected]
    failed = [o for o in outcomes if o.error and not o.rejected]
    ttft, tpot, e2e = Summary.of(o.ttft_ms for o in ok), Summary.of(o.tpot_ms for o in ok), Summary.of(o.e2e_ms for o in ok)
    out_tokens = sum(o.output_tokens for o in ok)
    print()
    print(format_table(["metric (ms)", "p50", "p90", "p99", "mean"],
                       [[name, s.p50, s.p90, s.p99, s.mean] for name, s in (("TTFT", ttft), ("TPOT", tpot), ("E2E", e2e))]))
    attainment = sum(o.met_sla for o in outcomes) / len(outcomes)
    print(f"\nrequests {len(outcomes)} (rejected at once by the router {len(rejected)}, failed {len(failed)}), "
          f"wall {wall:.1f} s, "
          f"throughput {len(ok) / wall:.2f} req/s, {out_tokens / wall:.1f} output tok/s, "
          f"SLA '{cfg.default_sla_class}' (TTFT {sla.ttft_ms:.0f} ms, TPOT {sla.tpot_ms:.0f} ms) attainment "
          f"{100 * attainment:.1f}%")
    err = prediction_error(ok)
    pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    print(f"router prediction error |predicted/actual - 1|: TTFT p50 {pct(err['ttft_p50'])} p90 {pct(err['ttft_p90'])}"
          f" (within the bound {pct(err['ttft_coverage'])}), TPOT p50 {pct(err['tpot_p50'])} p90 {pct(err['tpot_p90'])}"
          f" (within the bound {pct(err['tpot_coverage'])})")
    for o in outcomes:
        if o.error:
            print(f"  {'rejected' if o.rejected else 'failed'} {o.request_id}: {o.error}")
    for q, a in samples:
        print(f"\nQ: {q}\nA: {a.strip()}")
    return {
        "trace": str(wl.trace.name), "started_unix": started_unix, "scaling": asdict(scaling),
        "requests": len(outcomes), "failed": len(failed), "rejected": len(rejected), "prediction_error": err,
        "wall_s": wall, "throughput_req_s": len(ok) / wall, "output_tok_s": out_tokens / wall,
        "sla_class": cfg.default_sla_class, "sla": {"ttft_ms": sla.ttft_ms, "tpot_ms": sla.tpot_ms}, "sla_attainment": attainment,
        "ttft_ms": ttft.as_dict(), "tpot_ms": tpot.as_dict(), "e2e_ms": e2e.as_dict(),
        "pools": {"prefill": cfg.prefill.workers, "decode": cfg.decode.workers},
        "per_request": [asdict(o) for o in outcomes],
        "samples": [{"question": q, "answer": a} for q, a in samples],
    }
