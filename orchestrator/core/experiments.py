"""Scaling experiments from cluster.yaml's `metadata.experiments` (name -> spec), validated.

A spec sweeps the cross product of models, router policies, prefill replicas, decode replicas
(the P:D ratio) and request rates:

    azure-conv-70b:
      model: llama-3.1-70b            # or a list
      trace: /path/AzureLLMInferenceTrace_conv.csv   # or `poisson: {requests: N}` (lengths: trace)
      requests: 19366                 # optional cap on requests read
      rates: [native, 10, 20]         # requests/s ("native": the trace's own timing)
      sla: {ttft_ms: 2000, tpot_ms: 50}
      router_policy: least_loaded     # or a list
      prefill: {hardware: trn2.48xlarge, tp: 64, replicas: [1, 2, 3], token_budget: 8192, max_batch: 8}
      decode: {hardware: cs3, systems: 4, replicas: [1, 2], max_batch: 64, block_tokens: 16}
      colocated_baseline: true        # also run prefill+decode on the prefill hardware
      goodput: false                  # also search the goodput of every configuration (once each, not per rate)
      goodput_requests: 4000          # optional: search goodput on the first N requests (faster); default all
      fidelity: false                 # fidelity-cpu: compare with the live bench results
      max_prompt_tokens: 0            # > 0: fit lengths like the live bench does (fit_trace)
      max_output_tokens: 0
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core.config import ConfigReader, resolve_data_path
from orchestrator.core.router import POLICIES


@dataclass(frozen=True, slots=True)
class PoolSweep:
    hardware: str
    replicas: tuple[int, ...]
    max_batch: int
    tp: int | None = None
    systems: int | None = None
    token_budget: int = 4096
    block_tokens: int = 16
    kv_capacity_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Experiment:
    name: str
    models: tuple[str, ...]
    trace: Path
    requests: int | None
    rates: tuple[float | None, ...]  # None: the trace's own timing
    ttft_ms: float
    tpot_ms: float
    policies: tuple[str, ...]
    prefill: PoolSweep
    decode: PoolSweep
    colocated_baseline: bool
    goodput: bool
    poisson: bool
    fidelity: bool
    max_prompt_tokens: int = 0  # > 0: clip lengths like the live bench (orchestrator.core.trace.fit_trace)
    max_output_tokens: int = 0
    goodput_requests: int | None = None  # goodput search on the first N requests (None: all)


def _pool(s: ConfigReader, kind: str) -> PoolSweep:
    return PoolSweep(s.get("hardware", str), s.many("replicas", int, 1, minimum=1),
                     s.get("max_batch", int, 64 if kind == "decode" else 8, minimum=1),
                     s.get("tp", int, None, minimum=1), s.get("systems", int, None, minimum=1),
                     s.get("token_budget", int, 4096, minimum=1), s.get("block_tokens", int, 16, minimum=1),
                     s.get("kv_capacity_tokens", int, 0, minimum=0))


def _rates(s: ConfigReader) -> tuple[float | None, ...]:
    raw = s.tree.get("rates", ["native"])
    out = []
    for r in raw if isinstance(raw, list) else [raw]:
        if r == "native":
            out.append(None)
        elif isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0:
            out.append(float(r))
        else:
            raise s.error("rates", f"each rate must be > 0 requests/s or 'native', got {r!r}")
    return tuple(out)


def parse_experiment(path: Path, name: str, tree: Any) -> Experiment:
    s = ConfigReader(path, tree, f"metadata.experiments.{name}.")
    sla = s.sub("sla")
    policies = s.many("router_policy", str, "least_loaded")
    for p in policies:
        s.choice("router_policy", p, POLICIES, "policy")
    trace = resolve_data_path(Path(s.get("trace", str)), path.parent)
    poisson = s.get("poisson", bool, False)
    return Experiment(name, s.many("model", str), trace, s.get("requests", int, None, minimum=1), _rates(s),
                      sla.get("ttft_ms", float, minimum=1e-9), sla.get("tpot_ms", float, minimum=1e-9), policies,
                      _pool(s.sub("prefill"), "prefill"),
                      _pool(s.sub("decode"), "decode"),
                      s.get("colocated_baseline", bool, False), s.get("goodput", bool, False), poisson,
                      s.get("fidelity", bool, False), s.get("max_prompt_tokens", int, 0, minimum=0),
                      s.get("max_output_tokens", int, 0, minimum=0),
                      s.get("goodput_requests", int, None, minimum=2))


def parse_experiments(meta: Any, path: Path) -> dict[str, Experiment]:
    """All experiments under `metadata` (the loaded YAML mapping); ValueError naming file/key/reason."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: metadata: expected a mapping")
    tree = meta.get("experiments", {})
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: metadata.experiments: expected a mapping of name -> spec")
    return {str(name): parse_experiment(path, str(name), spec) for name, spec in tree.items()}


def get_experiment(exps: dict[str, Experiment], name: str, path: Path) -> Experiment:
    if name not in exps:
        raise ValueError(f"{path}: unknown experiment {name!r}; valid: {', '.join(exps) or '(none defined)'}")
    return exps[name]
