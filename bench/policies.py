"""The router policies side by side, live (issue 16, item 8): `python -m orchestrator bench --compare-policies`.

One prefill and two decode workers (local Ray, the real model, the gRPC API), two SLA classes: the
classes of the `router-comparison` experiment (its traces: conv for `interactive`, code for
`batch`), with the live targets of cluster.yaml's `sla_classes` of the same names. The traces are
merged by arrival, their lengths fitted to the small model as the live bench does, and replayed at
`factor` (1.5) x the capacity the performance model predicts for these pools on this host. Every
policy in turn runs the same requests on a fresh deployment, after a few warm-up requests. Per policy: goodput (requests completed
within their class's SLA per second of replay), per class the attainment of admitted requests and the
rejections, and the router's live prediction error. Writes bench/results/router-live.json.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, replace

import numpy as np

from bench.live import FILLER, Outcome, _one, auto_rate, prediction_error, prompt_ids

POLICIES = ("least_loaded", "cost", "sla")
# before each replay, two at a time (idle workers tie: the second goes to the other decode worker), in
# the replay's classes in turn, so every policy starts with its predictor's corrections warm on every
# worker and each class's "ttft" (the sla policy places rather than rejects on a prior: Router
# docstring); "tpot" learns from the replay's outputs of more than TPOT_MIN_GAPS gaps. The short prompts
# after the first twelve are for the decode workers' own prefills (`sla` prefills locally only once the
# prefill pool is learned): "local_prefill" and each class's "ttft" there need Corrections.min_samples
# each, two decode workers x two classes; at their prior the replay's first local prefills were
# predicted at half their TTFT
WARMUP_PROMPTS = (16, 32, 64, 128, 256, 16, 64, 128, 32, 256, 16, 64) + (16, 32, 48, 24) * 5


def workload(cfg, requests: int):
    """[(class name, TraceRequest)] of the router-comparison classes' traces merged by arrival, fitted."""
    from orchestrator.core.experiments import RouterComparison, parse_experiments
    from orchestrator.core.trace import load_azure_trace

    exp = next(e for e in parse_experiments(cfg.metadata, cfg.path).values() if isinstance(e, RouterComparison))
    rows = sorted(((c.name, r) for c in exp.classes for r in load_azure_trace(c.trace, limit=requests)),
                  key=lambda x: x[1].arrival_s)[:requests]
    missing = [name for name, _ in rows if name not in cfg.sla_classes]
    if missing:
        raise ValueError(f"sla_classes: the comparison's class {missing[0]!r} has no live targets in cluster.yaml")
    return rows


async def _replay(cfg, policy: str, rows, rate: float, tok, filler) -> dict:
    from orchestrator.client import AsyncClient
    from orchestrator.core.trace import fit_trace
    from orchestrator.serving.deployment import Deployment

    fitted, _ = fit_trace([r for _, r in rows], cfg.workload.max_prompt_tokens, cfg.workload.max_output_tokens, rate)
    classes = [name for name, _ in rows]
    async with Deployment(replace(cfg, router_policy=policy), port=0, metrics_port=0, http_port=0) as dep:
        async with AsyncClient(dep.target) as client:
            names = list(dict.fromkeys(classes))
            for k in range(0, len(WARMUP_PROMPTS), 2):  # a serving system is warm: the router rejects only on evidence
                await asyncio.gather(*(
                    _one(client, f"warmup-{i}", prompt_ids(tok, n, filler, i), 4, cfg.sla_classes[names[i % len(names)]],
                         0.0, time.perf_counter()) for i, n in enumerate(WARMUP_PROMPTS[k:k + 2], k)))
            for shares in dep.engine.workers.cpu_shares.values():  # the replay's, not the warm-up's
                shares.clear()
            t0 = time.perf_counter()
            outcomes: list[Outcome] = await asyncio.gather(*(
                _one(client, f"{policy}-{i}", prompt_ids(tok, r.prompt_tokens, filler, i), r.output_tokens,
                     cfg.sla_classes[c], r.arrival_s, t0, c) for i, (c, r) in enumerate(zip(classes, fitted))))
            wall = time.perf_counter() - t0
            cpu_share = {pool: _percentiles([x for w in workers for x in dep.engine.workers.cpu_shares[w]])
                         for pool, workers in (("prefill", dep.pools.prefill), ("decode", dep.pools.decode))}
    out = {"policy": policy, "wall_s": wall, "goodput_rps": sum(o.met_sla for o in outcomes) / wall,
           "failed": sum(bool(o.error and not o.rejected) for o in outcomes),
           "prediction_error": prediction_error([o for o in outcomes if not o.error]), "classes": {},
           # the share of a core the workers' compute got (decode steps, prefill batches): below 1, it waited
           # for a core other processes held, time the perf model's tables (measured alone) do not contain
           "cpu_share": cpu_share}
    for name in dict.fromkeys(classes):
        mine = [o for o, c in zip(outcomes, classes) if c == name]
        admitted = [o for o in mine if not o.rejected]
        out["classes"][name] = {"requests": len(mine), "rejected": len(mine) - len(admitted),
                                "admitted_attainment": sum(o.met_sla for o in admitted) / len(admitted) if admitted else None,
                                "attainment": sum(o.met_sla for o in mine) / len(mine)}
    out["per_request"] = [asdict(o) | {"sla_class": c} for o, c in zip(outcomes, classes)]
    return out


async def compare(cfg, requests: int = 60, factor: float = 1.5, policies=POLICIES) -> dict:
    """Each policy on the same replay; the result JSON (printed as a table)."""
    from model.loaded import load_model

    cfg = replace(cfg, decode=replace(cfg.decode, workers=2), prefill=replace(cfg.prefill, workers=1))
    rows = workload(cfg, requests)
    rate = auto_rate(cfg, [r for _, r in rows], factor)
    tok = load_model().tokenizer
    filler = tok.encode(FILLER)
    runs = []
    for policy in policies:
        print(f"policy {policy}: {len(rows)} requests at {rate:.3g} req/s", flush=True)
        runs.append(await _replay(cfg, policy, rows, rate, tok, filler))
    result = {"rate_rps": rate, "capacity_factor": factor, "requests": len(rows),
              "pools": {"prefill": 1, "decode": 2},
              "classes": {n: {"ttft_ms": s.ttft_ms, "tpot_ms": s.tpot_ms, "priority": s.priority}
                          for n, s in cfg.sla_classes.items() if any(c == n for c, _ in rows)},
              "runs": runs}
    print(table(result))
    return result


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p10": None, "p50": None, "p90": None}
    return {f"p{q}": float(np.percentile(values, q)) for q in (10, 50, 90)}


def table(result: dict) -> str:
    names = list(result["classes"])
    head = "| policy | goodput (req/s) | " + " | ".join(f"{n}: admitted met, rejected" for n in names) + \
        " | TTFT error p50/p90 | TPOT error p50/p90 | CPU share p50 (p10): prefill, decode |"
    lines = [head, "|---|---:|" + "---|" * len(names) + "---|---|---|"]
    pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    for r in result["runs"]:
        cells = " | ".join(f"{pct(r['classes'][n]['admitted_attainment'])}, {r['classes'][n]['rejected']}"
                           for n in names)
        e = r["prediction_error"]
        share = ", ".join(f"{pct(c['p50'])} ({pct(c['p10'])})" for c in map(r["cpu_share"].get, ("prefill", "decode")))
        lines.append(f"| {r['policy']} | {r['goodput_rps']:.2f} | {cells} | {pct(e['ttft_p50'])} / {pct(e['ttft_p90'])}"
                     f" | {pct(e['tpot_p50'])} / {pct(e['tpot_p90'])} | {share} |")
    return "\n".join(lines)
