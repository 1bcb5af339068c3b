"""The router-comparison experiment (issue 16, item 7): every router policy on SLA classes, simulated.

Each class brings its own trace and targets; the traces are merged by arrival time (each trace's
clock starts at its first request; the Azure conv and code traces cover the same hour) and the
first `requests` of the merge, so every class keeps its own share and timing, are rescaled to
rates relative to the pools' predicted capacity (capacity.py). For every policy and rate: SLA
attainment over all requests (a rejection is a miss) and per class, the rejections, and the
router's prediction error. The `sla` policy runs a second time at each rate with rejection off:
the fraction of the requests it rejected that then missed is `rejected_would_miss`. Goodput per
policy is the sustained goodput (search.goodput with a scan: the highest rate at which >= 90% of
all requests meet their own class's targets, every scanned rate below it passing too; `sla` with
local prefill can dip below 90% at one rate and recover at a higher one, as its prefills move to the
decode pool). With `local_prefill_max_tokens`, `sla` may prefill
short prompts on the decode pool (conditional disaggregation), and `sla_disaggregated`, the same
policy with that off, runs beside it as the ablation.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from orchestrator.core.experiments import RouterComparison
from orchestrator.core.sla import SLATarget
from orchestrator.simulator.capacity import Capacity, capacity
from orchestrator.simulator.engine import PoolSetup, SimConfig, Simulator, Trace
from orchestrator.simulator.report import met
from orchestrator.simulator.runner import deployment
from orchestrator.simulator.search import goodput
from orchestrator.simulator.workload import SimRequest, from_trace, rescale

SCAN_STEP = 2 ** 0.25  # the sustained goodput's scan (search.goodput): sla's attainment can dip and recover
TARGETS = {"goodput_vs_least_loaded": 1.5, "goodput_vs_cost": 1.2, "rejected_would_miss": 0.9, "ttft_p50": 0.10,
           "ttft_p90": 0.25, "tpot_p50": 0.05, "tpot_p90": 0.15}


def workload(exp: RouterComparison) -> list[SimRequest]:
    """The first `requests` of the classes' traces merged by arrival, each carrying its class's targets."""
    merged = []
    for c in exp.classes:
        sla = SLATarget(c.ttft_ms, c.tpot_ms, c.priority, c.name)
        merged += [replace(r, sla=sla) for r in from_trace(c.trace, limit=exp.requests)]
    merged.sort(key=lambda r: r.arrival_s)
    return [replace(r, rid=i) for i, r in enumerate(merged[:exp.requests])]


def pools(exp: RouterComparison) -> tuple[PoolSetup, PoolSetup]:
    pf, dc = exp.prefill, exp.decode
    return (PoolSetup(deployment(exp.model, pf), pf.replicas[0], pf.max_batch, pf.token_budget),
            PoolSetup(deployment(exp.model, dc), dc.replicas[0], dc.max_batch, block_tokens=dc.block_tokens,
                      kv_capacity_tokens=dc.kv_capacity_tokens))


def _errors(traces: list[Trace]) -> dict[str, float]:
    """Prediction error percentiles (|predicted / actual - 1|) and bound coverage pooled over runs."""
    e, cover = {"ttft": [], "tpot": []}, {"ttft": [], "tpot": []}
    for tr in traces:
        done = ~np.isnan(tr.finish)
        for name, actual, pred, bound in (("ttft", tr.ttft_s(), tr.pred_ttft, tr.bound_ttft),
                                          ("tpot", tr.tpot_s(), tr.pred_tpot, tr.bound_tpot)):
            ok = done & ~np.isnan(actual) & (actual > 0)
            e[name].append(np.abs(pred[ok] / actual[ok] - 1))
            cover[name].append(actual[ok] <= bound[ok])
    out = {}
    for name in ("ttft", "tpot"):
        x, c = np.concatenate(e[name]), np.concatenate(cover[name])
        out[f"{name}_p50"] = float(np.percentile(x, 50)) if x.size else float("nan")
        out[f"{name}_p90"] = float(np.percentile(x, 90)) if x.size else float("nan")
        out[f"{name}_coverage"] = float(c.mean()) if c.size else float("nan")
    return out


def _row(policy: str, factor: float, rate: float, tr: Trace, classes: np.ndarray, names: list[str]) -> dict:
    ok = met(tr)
    row = {"policy": policy, "rate_factor": factor, "rate": rate, "sla_attainment": float(ok.mean()),
           "rejected": float(tr.rejected.mean())}
    for name in names:
        mine = classes == name
        admitted = mine & ~tr.rejected
        row[f"{name}_attainment"] = float(ok[mine].mean())
        row[f"{name}_admitted_attainment"] = float(ok[admitted].mean()) if admitted.any() else float("nan")
        row[f"{name}_rejected"] = float(tr.rejected[mine].mean())
    row.update({f"error_{k}": v for k, v in _errors([tr]).items()})
    return row


def run(exp: RouterComparison, on_run: Callable[[str], None] = lambda _: None) -> dict:
    """Every policy at every rate factor, the would-miss runs and the goodput searches: the summary."""
    t0 = time.perf_counter()
    pf, dc = pools(exp)
    reqs = workload(exp)
    cap: Capacity = capacity(pf, dc, [(r.prompt_tokens, r.output_tokens) for r in reqs])
    names = [c.name for c in exp.classes]
    classes = np.array([r.sla.sla_class for r in reqs])
    base = SimConfig(pf, dc, reqs[0].sla, quantile=exp.quantile)
    rows, sla_traces, rejected, would_miss = [], [], 0, 0
    variants = variants_of(exp, base)
    for policy, cfg in variants.items():
        for factor in exp.rate_factors:
            on_run(f"{policy} @ {factor:g}x")
            rate = factor * cap.rps
            run_reqs = rescale(reqs, rate)
            tr = Simulator(cfg).run(run_reqs)
            rows.append(_row(policy, factor, rate, tr, classes, names))
            if policy == "sla":
                sla_traces.append(tr)
                if tr.rejected.any():
                    admitted_all = Simulator(replace(cfg, reject=False)).run(run_reqs)
                    rejected += int(tr.rejected.sum())
                    would_miss += int((~met(admitted_all)[tr.rejected]).sum())
    good = {}
    for policy, cfg in variants.items():
        on_run(f"goodput {policy}")
        good[policy] = goodput(cfg, reqs, lo=0.25 * cap.rps, hi=4 * cap.rps, iters=4, scan_step=SCAN_STEP).rate
    summary = {
        "experiment": exp.name, "model": exp.model,
        "pools": {"prefill": f"{pf.replicas} x {pf.dep.hw.name}", "decode": f"{dc.replicas} x {dc.dep.hw.name}"},
        "classes": {c.name: {"trace": c.trace.name, "ttft_ms": c.ttft_ms, "tpot_ms": c.tpot_ms,
                             "priority": c.priority, "requests": int((classes == c.name).sum())} for c in exp.classes},
        "capacity": {"rps": cap.rps, "prefill_rps": cap.prefill_rps, "decode_rps": cap.decode_rps,
                     "bottleneck": cap.bottleneck},
        "quantile": exp.quantile,
        "local_prefill_max_tokens": exp.local_prefill_max_tokens,
        "local_prefill_chunk_tokens": exp.local_prefill_chunk_tokens,
        "goodput": good,
        "prediction_error": _errors(sla_traces) if sla_traces else {},
        "rejected_would_miss": would_miss / rejected if rejected else float("nan"),
        "sla_rejected": rejected,
        "rows": rows,
        "wall_s": time.perf_counter() - t0,
    }
    summary["targets"] = targets(summary)
    return summary


def labels(exp: RouterComparison) -> list[str]:
    """The runs' labels: the experiment's policies, and `sla_disaggregated` (sla without local prefill)
    when local prefill is on."""
    extra = ["sla_disaggregated"] if "sla" in exp.policies and exp.local_prefill_max_tokens else []
    return list(exp.policies) + extra


def variants_of(exp: RouterComparison, base: SimConfig) -> dict[str, SimConfig]:
    """Label -> config of each run (`labels`): `sla` with the experiment's local prefill, every other off."""
    return {label: replace(base, router_policy="sla" if label == "sla_disaggregated" else label,
                           local_prefill_max_tokens=exp.local_prefill_max_tokens if label == "sla" else 0,
                           local_prefill_chunk_tokens=exp.local_prefill_chunk_tokens if label == "sla" else 0)
            for label in labels(exp)}


def targets(summary: dict) -> dict:
    """Each issue target: its value, what was measured and whether it is met (absent policies skipped)."""
    g, err, out = summary["goodput"], summary["prediction_error"], {}
    for name, ref in (("goodput_vs_least_loaded", "least_loaded"), ("goodput_vs_cost", "cost")):
        if "sla" in g and g.get(ref):
            ratio = g["sla"] / g[ref]
            out[name] = {"target": f">= {TARGETS[name]}", "measured": ratio, "met": ratio >= TARGETS[name]}
    x = summary["rejected_would_miss"]
    out["rejected_would_miss"] = {"target": ">= 0.9", "measured": x, "met": bool(x >= 0.9)}
    for k in ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90"):
        if k in err:
            out[f"prediction_error_{k}"] = {"target": f"<= {TARGETS[k]}", "measured": err[k],
                                            "met": bool(err[k] <= TARGETS[k])}
    return out


def table(summary: dict) -> str:
    """The terminal/README tables: goodput per policy, then attainment per policy, rate and class."""
    names = list(summary["classes"])
    lines = ["| policy | goodput (req/s) | vs least_loaded |", "|---|---|---|"]
    ll = summary["goodput"].get("least_loaded") or float("nan")
    for p, g in summary["goodput"].items():
        lines.append(f"| {p} | {g:.2f} | {g / ll:.2f}x |")
    lines += ["", "| policy | rate (x capacity) | attainment | " + " | ".join(f"{n} (rejected)" for n in names) + " |",
              "|---|---|---|" + "---|" * len(names)]
    for r in summary["rows"]:
        cells = " | ".join(f"{r[f'{n}_attainment']:.2f} ({r[f'{n}_rejected']:.2f})" for n in names)
        lines.append(f"| {r['policy']} | {r['rate_factor']:g} ({r['rate']:.1f} req/s) | {r['sla_attainment']:.2f} | "
                     f"{cells} |")
    e = summary["prediction_error"]
    if e:
        lines += ["", f"sla prediction error |predicted/actual - 1|: TTFT p50 {e['ttft_p50']:.3f} "
                      f"p90 {e['ttft_p90']:.3f} (bound coverage {e['ttft_coverage']:.2f}), "
                      f"TPOT p50 {e['tpot_p50']:.3f} p90 {e['tpot_p90']:.3f}"
                      f" (coverage {e['tpot_coverage']:.2f}); rejected that would have missed: "
                      f"{summary['rejected_would_miss']:.2f} of {summary['sla_rejected']}"]
    lines += [f"target {k} {t['target']}: {t['measured']:.3g} -> {'met' if t['met'] else 'NOT met'}"
              for k, t in summary["targets"].items()]
    return "\n".join(lines)


def write(out: Path, summary: dict) -> list[Path]:
    """summary.json, results.csv (one row per policy and rate) and attainment_vs_rate.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary["rows"][0]))
        w.writeheader()
        w.writerows(summary["rows"])
    return [out / "summary.json", out / "results.csv", plot(out, summary)]


def plot(out: Path, summary: dict) -> Path:
    """SLA attainment vs rate: a panel per class plus all requests, a line per policy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["classes"])
    panels = [("sla_attainment", "all requests")] + [(f"{n}_attainment", n) for n in names]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), sharey=True)
    policies = list(dict.fromkeys(r["policy"] for r in summary["rows"]))
    for ax, (key, title) in zip(axes, panels):
        for i, p in enumerate(policies):
            rs = sorted((r for r in summary["rows"] if r["policy"] == p), key=lambda r: r["rate"])
            ax.plot([r["rate_factor"] for r in rs], [r[key] for r in rs], marker="o", c=f"C{i}", label=p)
        ax.axhline(0.9, ls=":", c="grey")
        ax.set(title=title, xlabel="rate (x predicted capacity)", ylim=(0, 1.02))
    axes[0].set_ylabel("SLA attainment (rejections are misses)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{summary['model']}: {summary['pools']['prefill']} prefill, {summary['pools']['decode']} decode",
                 fontsize=9)
    path = out / "attainment_vs_rate.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
