"""`simulate`: run the scaling experiments under cluster.yaml's metadata.experiments."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from orchestrator.cli import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="cluster.yaml", help="cluster.yaml with metadata.experiments")
    p.add_argument("--experiment", help="run only this experiment (default: all)")
    p.add_argument("--results", default="results", help="output folder (results/NAME/...)")
    g = p.add_argument_group("overrides of the experiment's cluster.yaml settings (for a targeted run)")
    g.add_argument("--goodput", action="store_true", help="also search each configuration's goodput")
    g.add_argument("--goodput-requests", type=int, help="search goodput on the first N requests of the trace")
    g.add_argument("--rates", help="comma-separated requests/s or 'native', e.g. native,10,20")
    g.add_argument("--prefill-replicas", help="comma-separated prefill pool sizes, e.g. 1,2,4")
    g.add_argument("--decode-replicas", help="comma-separated decode pool sizes, e.g. 1,2")
    g.add_argument("--quantile", type=float, help="router-comparison: the sla policy's confidence, in (0, 1)")


def _ints(flag: str, text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise UserError(f"{flag}: each value must be >= 1, got {text!r}")
    return out


def apply_overrides(exp, args):
    """The experiment with the command-line overrides applied (UserError naming the flag)."""
    from dataclasses import replace
    if getattr(args, "goodput", False):
        exp = replace(exp, goodput=True)
    if getattr(args, "goodput_requests", None) is not None:
        if args.goodput_requests < 2:
            raise UserError(f"--goodput-requests: must be >= 2, got {args.goodput_requests}")
        exp = replace(exp, goodput_requests=args.goodput_requests)
    if getattr(args, "rates", None):
        rates = []
        for x in args.rates.split(","):
            try:
                r = None if x.strip() == "native" else float(x)
            except ValueError:
                raise UserError(f"--rates: expected numbers or 'native', got {x!r}") from None
            if r is not None and not r > 0:
                raise UserError(f"--rates: each rate must be > 0 requests/s, got {x}")
            rates.append(r)
        exp = replace(exp, rates=tuple(rates))
    if getattr(args, "prefill_replicas", None):
        exp = replace(exp, prefill=replace(exp.prefill, replicas=_ints("--prefill-replicas", args.prefill_replicas)))
    if getattr(args, "decode_replicas", None):
        exp = replace(exp, decode=replace(exp.decode, replicas=_ints("--decode-replicas", args.decode_replicas)))
    return exp


def comparison_overrides(exp, args):
    """A router comparison with `--quantile` applied (UserError naming the flag)."""
    from dataclasses import replace

    from orchestrator.core.correction import check_quantile
    q = getattr(args, "quantile", None)
    if q is None:
        return exp
    try:
        return replace(exp, quantile=check_quantile(q))
    except ValueError as e:  # check_quantile's message, named as the flag
        raise UserError(f"--{e}") from None


def load_experiments(path: Path):
    from orchestrator.core.config import read_yaml
    from orchestrator.core.experiments import parse_experiments

    try:
        tree = read_yaml(path)
        if not isinstance(tree, dict) or "metadata" not in tree:
            raise UserError(f"{path}: metadata: missing")
        return parse_experiments(tree["metadata"], path)
    except ValueError as e:  # ConfigError included
        raise UserError(str(e)) from None


def run(args) -> int:
    from tqdm import tqdm
    from orchestrator.core.experiments import RouterComparison, get_experiment
    from orchestrator.simulator import output
    from orchestrator.simulator.runner import config_goodput, config_key, points, run_point, workload
    from orchestrator.simulator.workload import TraceError
    path = Path(args.config)
    exps = load_experiments(path)
    try:
        chosen = [get_experiment(exps, args.experiment, path)] if args.experiment else list(exps.values())
    except ValueError as e:
        raise UserError(str(e)) from None
    if not chosen:
        raise UserError(f"{path}: metadata.experiments: no experiments defined")
    if any("cpu" in (exp.prefill.hardware, exp.decode.hardware) for exp in chosen):
        from bench.cpu_profile import ensure_measured
        ensure_measured()  # the `cpu` profile is this host's measurement: an explicit, announced step
    for exp in chosen:
        if isinstance(exp, RouterComparison):
            run_comparison(comparison_overrides(exp, args), Path(args.results))
            continue
        exp = apply_overrides(exp, args)
        try:
            pts = points(exp)
            reqs = workload(exp)
        except TraceError as e:
            raise UserError(f"experiment {exp.name}: trace: {e}") from None
        except ValueError as e:
            raise UserError(f"experiment {exp.name}: {e}") from None
        gp_reqs = reqs[:exp.goodput_requests] if exp.goodput_requests else reqs
        results, goodputs = [], {}
        t_all = time.perf_counter()
        bar = tqdm(pts, desc=exp.name, unit="run")
        for p in bar:
            bar.set_postfix_str(f"P{p.prefill_replicas}:D{p.decode_replicas} {p.mode} @{p.rate or 'native'}")
            try:
                res = run_point(p, reqs)
                if exp.goodput:  # a property of the configuration: searched once, shared by its rates
                    key = config_key(p)
                    if key not in goodputs:
                        goodputs[key] = config_goodput(p, gp_reqs, res.row["units"], res.row["price_per_hour"])
                    res.row.update(goodputs[key])
            except ValueError as e:  # e.g. no room for KV next to the weights
                raise UserError(f"experiment {exp.name}: {res_label(p)}: {e}") from None
            results.append(res)
        elapsed = time.perf_counter() - t_all
        rows = [r.row for r in results]
        extra = {"trace": str(exp.trace), "requests": len(reqs), "sla": {"ttft_ms": exp.ttft_ms, "tpot_ms": exp.tpot_ms},
                 "sweep_wall_s": elapsed, "goodput_requests": len(gp_reqs) if exp.goodput else None}
        native = [r for r, p in zip(rows, pts) if p.rate is None]
        if native:  # the speed target: the whole trace at its own timing
            extra["full_trace_sim_s"] = {r["config"]: r["sim_wall_s"] for r in native}
        if exp.fidelity:
            from bench.fidelity import compare, describe
            extra["fidelity"] = compare(exp, reqs)
        files = output.write(Path(args.results) / exp.name, exp.name, results, extra)
        print(output.table(rows))
        print(output.misses_table(rows))
        if native:
            worst = max(native, key=lambda r: r["sim_wall_s"])
            print(f"simulator speed: whole trace ({len(reqs)} requests, native rate {worst['rate']:.3g} req/s) in "
                  f"{min(r['sim_wall_s'] for r in native):.2f}-{worst['sim_wall_s']:.2f} s per configuration "
                  f"(slowest: {worst['config']})")
        if exp.fidelity:
            print(describe(extra["fidelity"]))
        print(f"{len(pts)} runs{' + goodput searches' if exp.goodput else ''} in {elapsed:.1f} s")
        print("wrote " + ", ".join(str(f) for f in files))
    return 0


def run_comparison(exp, results: Path) -> None:
    """The router-comparison experiment: every policy, its tables, results/NAME/{summary.json, ...}."""
    from tqdm import tqdm
    from orchestrator.simulator import comparison
    from orchestrator.simulator.workload import TraceError

    runs = len(comparison.labels(exp)) * len(exp.rate_factors)
    bar = tqdm(total=runs, desc=exp.name, unit="run")
    try:
        summary = comparison.run(exp, lambda what: (bar.set_postfix_str(what), bar.update(what[:7] != "goodput")))
    except TraceError as e:
        raise UserError(f"experiment {exp.name}: trace: {e}") from None
    except ValueError as e:
        raise UserError(f"experiment {exp.name}: {e}") from None
    finally:
        bar.close()
    cap = summary["capacity"]
    print(f"predicted capacity {cap['rps']:.3g} req/s ({cap['bottleneck']}-bound); "
          f"{summary['sla_rejected']} sla rejections; {summary['wall_s']:.0f} s")
    print(comparison.table(summary))
    files = comparison.write(results / exp.name, summary)
    print("wrote " + ", ".join(str(f) for f in files))


def res_label(p) -> str:
    from orchestrator.simulator.runner import label
    return f"{label(p)} at {p.rate or 'native'} req/s"
