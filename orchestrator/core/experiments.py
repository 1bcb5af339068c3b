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

A spec with `classes` is a router comparison (orchestrator/simulator/comparison.py): SLA classes, each
from its own trace, merged by arrival time, every router policy at rates relative to the pools'
predicted capacity (orchestrator/simulator/capacity.py):

    router-comparison:
      model: llama-3.1-70b
      classes:                        # name -> its trace (first `requests` rows) and targets
        interactive: {trace: .../AzureLLMInferenceTrace_conv.csv, ttft_ms: 1500, tpot_ms: 15, priority: 1}
        batch: {trace: .../AzureLLMInferenceTrace_code.csv, ttft_ms: 20000, tpot_ms: 60, priority: 0}
      requests: 3000                  # the first N of the traces merged by arrival
      router_policy: [round_robin, least_loaded, cost, sla]
      rate_factors: [0.5, 1.0, 1.5, 2.0]   # x the predicted capacity
      prefill: {hardware: trn2.48xlarge, tp: 64, replicas: 2, token_budget: 8192, max_batch: 8}
      decode: {hardware: cs3, systems: 4, replicas: 2, max_batch: 64, block_tokens: 16}
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


@dataclass(frozen=True, slots=True)
class SLAClass:
    name: str
    trace: Path
    ttft_ms: float
    tpot_ms: float
    priority: int


@dataclass(frozen=True, slots=True)
class RouterComparison:
    name: str
    model: str
    classes: tuple[SLAClass, ...]
    requests: int  # the first N of the classes' traces merged by arrival
    policies: tuple[str, ...]
    rate_factors: tuple[float, ...]  # x the predicted capacity
    prefill: PoolSweep  # one replica count each
    decode: PoolSweep
    quantile: float = 0.9  # the sla policy's confidence
    local_prefill_max_tokens: int = 0  # the sla policy's conditional disaggregation (0: off)
    local_prefill_chunk_tokens: int = 0  # its local prefills ride the decode steps, this many tokens a step (0: whole)


def _pool(s: ConfigReader, kind: str) -> PoolSweep:
    return PoolSweep(s.hardware("hardware"), s.many("replicas", int, 1, minimum=1),
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


def parse_comparison(path: Path, name: str, tree: Any) -> RouterComparison:
    s = ConfigReader(path, tree, f"metadata.experiments.{name}.")
    cls_r = s.sub("classes")
    if not isinstance(cls_r.tree, dict) or not cls_r.tree:
        raise s.error("classes", "expected a mapping of class name -> {trace, ttft_ms, tpot_ms, priority}")
    classes = []
    for cname in cls_r.tree:
        c = cls_r.sub(cname)
        classes.append(SLAClass(str(cname), resolve_data_path(Path(c.get("trace", str)), path.parent),
                                c.get("ttft_ms", float, minimum=1e-9), c.get("tpot_ms", float, minimum=1e-9),
                                c.get("priority", int, 0)))
    policies = s.many("router_policy", str, list(POLICIES))
    for p in policies:
        s.choice("router_policy", p, POLICIES, "policy")
    pf, dc = _pool(s.sub("prefill"), "prefill"), _pool(s.sub("decode"), "decode")
    for key, pool in (("prefill", pf), ("decode", dc)):
        if len(pool.replicas) != 1:
            raise s.error(f"{key}.replicas", "a router comparison runs one pool size (a number, not a list)")
    quantile = s.get("quantile", float, 0.9)
    if not 0.0 < quantile < 1.0:
        raise s.error("quantile", f"must be in (0, 1), got {quantile}")
    return RouterComparison(name, s.get("model", str), tuple(classes), s.get("requests", int, 3000, minimum=1),
                            policies, s.many("rate_factors", float, [0.5, 1.0, 1.5, 2.0], minimum=1e-9), pf, dc,
                            quantile, s.get("local_prefill_max_tokens", int, 0, minimum=0),
                            s.get("local_prefill_chunk_tokens", int, 0, minimum=0))


def parse_experiments(meta: Any, path: Path) -> dict[str, Experiment | RouterComparison]:
    """All experiments under `metadata` (the loaded YAML mapping); ValueError naming file/key/reason."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: metadata: expected a mapping")
    tree = meta.get("experiments", {})
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: metadata.experiments: expected a mapping of name -> spec")
    return {str(name): (parse_comparison if isinstance(spec, dict) and "classes" in spec else parse_experiment)(
        path, str(name), spec) for name, spec in tree.items()}


def get_experiment(exps: dict, name: str, path: Path) -> Experiment | RouterComparison:
    if name not in exps:
        raise ValueError(f"{path}: unknown experiment {name!r}; valid: {', '.join(exps) or '(none defined)'}")
    return exps[name]
