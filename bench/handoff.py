"""Disaggregation overhead: TTFT of a 1,000-token prompt through the pools vs in one process.

    python -m bench.handoff [--prompt-tokens 1000] [--repeats 5]

Disaggregated: the real deployment (local Ray, 1 prefill + 1 decode worker, gRPC frontend, KV over
gRPC streamed layer by layer), TTFT measured by the client. Colocated: the same model in this
process with the same BLAS thread count: prefill, then sample the first token. That baseline is
the strictest one (the first token comes from the prefill's logits on both paths); the first
decode step the issue's wording adds is measured and reported separately. Medians of interleaved
repeats; writes bench/results/handoff.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from orchestrator.cli.serve import DEFAULT_CONFIG
from bench import RESULTS


def overhead(disaggregated_s: Sequence[float], colocated_s: Sequence[float]) -> float:
    """Relative TTFT cost of disaggregation: median disaggregated over median colocated, minus one."""
    return statistics.median(disaggregated_s) / statistics.median(colocated_s) - 1.0


def _colocated(lm, ids: list[int]) -> tuple[float, float]:
    """(prefill + first token, first decode step) seconds in this process."""
    from model.transformer import DenseKVCache

    t0 = time.perf_counter()
    logits, ks, vs = lm.model.prefill(ids)
    first = int(np.argmax(logits))
    t1 = time.perf_counter()
    cache = DenseKVCache(lm.model.cfg, 1, len(ids) + 2)
    cache.load_prefill(0, ks, vs)
    t2 = time.perf_counter()
    lm.model.decode_step(np.array([first]), cache.lengths.copy(), cache)
    return t1 - t0, time.perf_counter() - t2


async def _run(args) -> dict:
    from threadpoolctl import threadpool_limits

    from model.loaded import load_model
    from orchestrator.client import AsyncClient
    from orchestrator.core.config import load_config
    from orchestrator.serving.deployment import Deployment
    from orchestrator.core.summary import format_table
    from orchestrator.client.timing import StreamTiming

    cfg = load_config(args.config)
    load_start = os.getloadavg()
    lm = load_model()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, lm.weights.config.vocab_size, args.prompt_tokens).tolist() for _ in range(args.repeats)]
    threadpool_limits(cfg.prefill.blas_threads)  # the prefill actor's setting
    _colocated(lm, prompts[0][:64])  # warm-up
    dis, col, step, transfer_tail, actor_prefill = [], [], [], [], []
    async with Deployment(cfg, port=0, metrics_port=0, http_port=0) as dep:
        async with AsyncClient(dep.target) as client:
            await client.complete(token_ids=prompts[0][:64], max_tokens=2)  # warm-up
            for ids in prompts:  # interleaved, so load changes hit both sides alike
                timing = await StreamTiming().consume(client.generate(token_ids=ids, max_tokens=2))
                dis.append(timing.ttft_s)
                transfer_tail.append(timing.final.timings.transfer_ms / 1e3)
                actor_prefill.append(timing.final.timings.prefill_ms / 1e3)
                c, s = _colocated(lm, ids)
                col.append(c)
                step.append(s)
    d, c = statistics.median(dis), statistics.median(col)
    result = {
        "prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "blas_threads": cfg.prefill.blas_threads,
        "ttft_disaggregated_s": d, "ttft_colocated_s": c, "overhead": overhead(dis, col),
        "first_decode_step_s": statistics.median(step),
        "overhead_vs_prefill_plus_first_step": d / (c + statistics.median(step)) - 1.0,
        "transfer_tail_s": statistics.median(transfer_tail),
        "prefill_in_actor_s": statistics.median(actor_prefill),  # compute inside the prefill actor
        "loadavg_at_start": load_start, "loadavg_at_end": os.getloadavg(),  # shared 2-core machine
        "samples": {"disaggregated_s": dis, "colocated_s": col},
    }
    print(format_table(["path", "TTFT median (s)", "min", "max"], [
        ["disaggregated (Ray + gRPC KV)", d, min(dis), max(dis)],
        ["colocated (one process)", c, min(col), max(col)]], floatfmt="{:.3f}"))
    print(f"\noverhead {100 * result['overhead']:+.1f}% (target <= 10%); KV transfer tail after the last layer "
          f"{1e3 * result['transfer_tail_s']:.1f} ms; vs prefill + first decode step "
          f"{100 * result['overhead_vs_prefill_plus_first_step']:+.1f}%; prefill compute inside the actor "
          f"{result['prefill_in_actor_s']:.3f} s")
    return result


def main(argv=None) -> int:
    from orchestrator.logging_setup import configure_logging

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", type=Path, default=RESULTS / "handoff.json")
    args = p.parse_args(argv)
    if args.prompt_tokens < 1 or args.repeats < 1:
        p.error("--prompt-tokens and --repeats must be >= 1")
    configure_logging()
    result = asyncio.run(_run(args))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
