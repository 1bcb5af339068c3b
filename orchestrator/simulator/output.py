"""Writes an experiment's results: results.csv, summary.json, requests.csv (per request, best
configuration), PNG plots, and the terminal tables (results and SLO-miss attribution)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from orchestrator.simulator.report import PHASES

TABLE_COLUMNS = ("config", "rate", "sla_attainment", "ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms",
                 "goodput_rps", "goodput_per_unit", "goodput_per_dollar_hour", "cost_per_m_tokens",
                 "kwh_per_m_tokens", "price_per_hour")
SHORT = {"sla_attainment": "SLA", "ttft_p50_ms": "TTFT50ms", "ttft_p90_ms": "TTFT90ms", "tpot_p50_ms": "TPOT50ms",
         "tpot_p90_ms": "TPOT90ms", "goodput_rps": "goodput", "goodput_per_unit": "gp/unit",
         "goodput_per_dollar_hour": "gp/($/h)", "cost_per_m_tokens": "$/Mtok", "kwh_per_m_tokens": "kWh/Mtok",
         "price_per_hour": "$/h"}


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "-"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3g}"
    return str(v)


def _render(cols: list[str], rows: list[list[str]], heads: list[str]) -> str:
    width = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(heads)]
    line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs, width))  # noqa: E731
    return "\n".join([line(heads)] + [line(x) for x in rows])


def table(rows: list[dict]) -> str:
    """The results table: one line per (configuration, rate)."""
    cols = [c for c in TABLE_COLUMNS if rows and c in rows[0]]
    return _render(cols, [[_fmt(r.get(c)) for c in cols] for r in rows], [SHORT.get(c, c) for c in cols])


def misses_table(rows: list[dict]) -> str:
    """SLO-miss attribution: requests whose miss each phase caused, per (configuration, rate), and
    the handoffs refused at open for want of KV blocks."""
    cols = ["config", "rate", "requests"] + [f"miss_{p}" for p in PHASES] + ["kv_refusals"]
    heads = ["SLO misses by phase", "rate", "requests"] + list(PHASES) + ["kv_refused"]
    return _render(cols, [[_fmt(r.get(c)) for c in cols] for r in rows], heads)


def best_row(rows: list[dict]) -> dict:
    """Cheapest per token among the runs meeting 90% attainment (else the highest attainment)."""
    ok = [r for r in rows if r["sla_attainment"] >= 0.9]
    return min(ok, key=lambda r: r["cost_per_m_tokens"]) if ok else max(rows, key=lambda r: r["sla_attainment"])


def _summary(name: str, rows: list[dict], extra: dict) -> dict:
    keep = ("config", "mode", "rate", "sla_attainment", "ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms",
            "cost_per_m_tokens", "kwh_per_m_tokens", "price_per_hour", "units", "sim_wall_s") + \
        tuple(f"miss_{p}" for p in PHASES)
    configs: dict[str, dict] = {}
    for r in rows:
        c = configs.setdefault(r["config"], {k: r[k] for k in ("mode", "prefill_replicas", "decode_replicas", "units",
                                                               "price_per_hour", "prefill_hw", "decode_hw")})
        for k in ("goodput_rps", "goodput_per_unit", "goodput_per_dollar_hour"):
            if k in r:
                c[k] = r[k]
        c.setdefault("runs", []).append({k: r[k] for k in keep if k in r and k not in c})
    colo = [r for r in rows if r["mode"] == "colocated"]
    dis = [r for r in rows if r["mode"] == "disagg"]
    out = {"experiment": name, "points": len(rows), "best": best_row(rows),
           "best_disaggregated": best_row(dis) if dis else None,
           "best_colocated_baseline": best_row(colo) if colo else None, "configurations": configs, **extra}
    if any("goodput_rps" in r for r in rows):
        out["best_goodput_per_dollar"] = max(configs.items(), key=lambda kv: kv[1].get("goodput_per_dollar_hour", 0))[0]
    return out


def write(out: Path, name: str, results: list, extra: dict) -> list[Path]:
    """results: orchestrator.simulator.runner.PointResult list."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [r.row for r in results]
    files = [out / "results.csv", out / "summary.json", out / "requests.csv"]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(files[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    summary = _summary(name, rows, extra)
    best = results[rows.index(summary["best"])]
    summary["requests_csv"] = {"config": best.row["config"], "rate": best.row["rate"]}
    files[1].write_text(json.dumps(summary, indent=1, default=float))
    from orchestrator.simulator.runner import request_table
    cols = request_table(best)
    with open(files[2], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(cols))
        for i in range(len(cols["request"])):
            w.writerow([_cell(v[i]) for v in cols.values()])
    files += _plots(out, results)
    return files


def _cell(v):
    if isinstance(v, (float, np.floating)):
        return "" if math.isnan(v) else f"{float(v):.6g}"
    return v.item() if isinstance(v, np.generic) else v


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plots(out: Path, results: list) -> list[Path]:
    rows = [r.row for r in results]
    files = [plot_sla(out, rows)]
    if "goodput_rps" in rows[0]:
        files.append(plot_goodput(out, rows))
    files.append(plot_cdfs(out, results))
    return files


def _colour(i: int, mode: str):
    import matplotlib
    return matplotlib.colormaps["tab10" if mode == "disagg" else "Dark2"](i % 8)


def plot_sla(out: Path, rows: list[dict]) -> Path:
    """SLA attainment vs request rate, one line per configuration (colocated dashed)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["config"], []).append(r)
    count = {"disagg": 0, "colocated": 0}
    for label, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["rate"])
        mode = rs[0]["mode"]
        ax.plot([r["rate"] for r in rs], [r["sla_attainment"] for r in rs], marker="o" if mode == "disagg" else "s",
                ls="--" if mode == "colocated" else "-", c=_colour(count[mode], mode), label=label)
        count[mode] += 1
    ax.set(xlabel="request rate (req/s)", ylabel="SLA attainment (TTFT and TPOT met)", ylim=(0, 1.02),
           title="SLA attainment vs request rate (dashed: colocated baseline)")
    ax.axhline(0.9, ls=":", c="grey")
    ax.legend(fontsize=6, ncol=2)
    path = out / "sla_vs_rate.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_goodput(out: Path, rows: list[dict]) -> Path:
    """Goodput per unit and per $/h vs P:D ratio: a line per decode pool size, colocated as reference lines."""
    plt = _plt()
    configs = {r["config"]: r for r in rows}.values()
    dis = [r for r in configs if r["mode"] == "disagg"]
    colo = sorted((r for r in configs if r["mode"] == "colocated"), key=lambda r: r["prefill_replicas"])
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4))
    ratios = sorted({r["pd_ratio"] for r in dis})
    for ax, key, ylabel in ((axes[0], "goodput_per_unit", "goodput per unit (req/s per instance or system)"),
                            (axes[1], "goodput_per_dollar_hour", r"goodput per \$/h (req/s per \$/h)")):
        for i, nd in enumerate(sorted({r["decode_replicas"] for r in dis})):
            rs = sorted((r for r in dis if r["decode_replicas"] == nd), key=lambda r: r["pd_ratio"])
            ax.plot([r["pd_ratio"] for r in rs], [r[key] for r in rs], "o-", c=_colour(i, "disagg"),
                    label=f"disagg, {nd} decode replica(s)")
        for i, r in enumerate(colo):
            ax.axhline(r[key], ls="--", lw=0.9, c=_colour(i, "colocated"), label=f"{r['config']} (baseline)")
        ax.set(xlabel="P:D ratio (prefill replicas / decode replicas)", ylabel=ylabel, xscale="log")
        ax.set_xticks(ratios, [f"{x:.3g}" for x in ratios])
        ax.minorticks_off()
    axes[0].legend(fontsize=6)
    fig.suptitle("goodput (highest rate with >= 90% meeting TTFT and TPOT) vs P:D ratio", fontsize=9)
    path = out / "goodput_vs_pd.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_cdfs(out: Path, results: list) -> Path:
    """TTFT and TPOT CDFs of every configuration at one rate (the native rate if swept, else the lowest)."""
    plt = _plt()
    chosen = _cdf_runs(results)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10.5, 4))
    count = {"disagg": 0, "colocated": 0}
    for res in chosen:
        mode = res.row["mode"]
        for ax, x in ((a1, res.ttft_ms), (a2, res.tpot_ms)):
            if x.size:
                xs = np.sort(x)
                ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, ls="--" if mode == "colocated" else "-",
                        c=_colour(count[mode], mode), label=res.row["config"])
        count[mode] += 1
    rate = chosen[0].row["rate"] if chosen else float("nan")
    a1.set(xlabel="TTFT (ms)", ylabel="CDF", xscale="log", title=f"TTFT at {rate:.3g} req/s")
    a2.set(xlabel="TPOT (ms)", ylabel="CDF", xscale="log", title=f"TPOT at {rate:.3g} req/s")
    a1.legend(fontsize=6)
    path = out / "latency_cdfs.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _cdf_runs(results: list) -> list:
    """One run per configuration at a common rate: the native timing if swept, else the lowest rate."""
    by_cfg: dict[str, list] = {}
    for res in results:
        by_cfg.setdefault(res.row["config"], []).append(res)
    return [min(rs, key=lambda r: r.row["rate"]) for rs in by_cfg.values()][:16]
