"""`simulate`: run the scaling experiments under cluster.yaml's metadata.experiments."""
from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.cli import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="cluster.yaml", help="cluster.yaml with metadata.experiments")
    p.add_argument("--experiment", help="run only this experiment (default: all)")
    p.add_argument("--results", default="results", help="output folder (results/NAME/...)")


def load_experiments(path: Path):
    import yaml
    from orchestrator.experiments import parse_experiments
    try:
        tree = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict) or "metadata" not in tree:
        raise UserError(f"{path}: metadata: missing")
    try:
        return parse_experiments(tree["metadata"], path)
    except ValueError as e:
        raise UserError(str(e)) from None


def run(args) -> int:
    from tqdm import tqdm
    from orchestrator.experiments import get_experiment
    from orchestrator.sim import output
    from orchestrator.sim.runner import points, run_point, workload
    from orchestrator.sim.workload import TraceError
    path = Path(args.config)
    exps = load_experiments(path)
    try:
        chosen = [get_experiment(exps, args.experiment, path)] if args.experiment else list(exps.values())
    except ValueError as e:
        raise UserError(str(e)) from None
    if not chosen:
        raise UserError(f"{path}: metadata.experiments: no experiments defined")
    for exp in chosen:
        try:
            pts = points(exp)
            reqs = workload(exp)
        except TraceError as e:
            raise UserError(f"experiment {exp.name}: trace: {e}") from None
        except ValueError as e:
            raise UserError(f"experiment {exp.name}: {e}") from None
        rows, cdfs = [], []
        for p in tqdm(pts, desc=exp.name, unit="run"):
            row, ttft, tpot = run_point(p, reqs, exp.goodput)
            rows.append(row)
            cdfs.append((f"{row['mode']} P{p.prefill_replicas}:D{p.decode_replicas} @{row['rate']:.3g}", ttft, tpot))
        extra = {}
        if exp.fidelity:
            from orchestrator.sim.fidelity import compare
            extra["fidelity"] = compare(exp, reqs)
        files = output.write(Path(args.results) / exp.name, exp.name, rows, cdfs, extra)
        print(output.table(rows))
        print("wrote " + ", ".join(str(f) for f in files))
    return 0
