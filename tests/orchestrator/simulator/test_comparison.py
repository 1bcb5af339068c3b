"""The router-comparison experiment at a small size, its config and the capacity it is swept against."""
import json
import math

import pytest
import yaml

from hardware.perf import make_deployment
from hardware.profiles import get_profile
from model.specs import get_spec
from orchestrator.core.experiments import RouterComparison, parse_experiments
from orchestrator.simulator import comparison
from orchestrator.simulator.capacity import capacity
from orchestrator.simulator.engine import PoolSetup
from tests.paths import REPO, shared_data

CONV = "azure-llm-2023/AzureLLMInferenceTrace_conv.csv"
CODE = "azure-llm-2023/AzureLLMInferenceTrace_code.csv"


def _experiment(tmp_path, **over) -> RouterComparison:
    spec = {"model": "llama-3.1-70b", "requests": 240, "router_policy": ["least_loaded", "sla"],
            "rate_factors": [0.5, 2.0],
            "classes": {"interactive": {"trace": str(shared_data(CONV)), "ttft_ms": 1500, "tpot_ms": 15, "priority": 1},
                        "batch": {"trace": str(shared_data(CODE)), "ttft_ms": 20000, "tpot_ms": 60}},
            "prefill": {"hardware": "trn2.48xlarge", "tp": 64, "replicas": 1, "token_budget": 8192},
            "decode": {"hardware": "cs3", "systems": 4, "replicas": 1, "block_tokens": 16}} | over
    return parse_experiments({"experiments": {"rc": spec}}, tmp_path / "cluster.yaml")["rc"]


def test_the_comparison_runs_every_policy_and_counts_what_sla_rejected(tmp_path):
    exp = _experiment(tmp_path)
    reqs = comparison.workload(exp)
    assert len(reqs) == 240 and {r.sla.sla_class for r in reqs} == {"interactive", "batch"}
    assert [r.arrival_s for r in reqs] == sorted(r.arrival_s for r in reqs)
    s = comparison.run(exp)
    assert set(s["goodput"]) == {"least_loaded", "sla"} and all(g >= 0 for g in s["goodput"].values())
    assert [(r["policy"], r["rate_factor"]) for r in s["rows"]] == [
        ("least_loaded", 0.5), ("least_loaded", 2.0), ("sla", 0.5), ("sla", 2.0)]
    overloaded = s["rows"][3]
    assert overloaded["rejected"] > 0 and s["sla_rejected"] > 0  # twice the capacity: sla turns some away
    assert all(r["rejected"] == 0 for r in s["rows"][:2])  # least_loaded never rejects
    assert 0 <= s["rejected_would_miss"] <= 1 and set(s["prediction_error"]) >= {"ttft_p50", "tpot_p90"}
    assert s["rows"][2]["sla_attainment"] >= s["rows"][3]["sla_attainment"]
    files = comparison.write(tmp_path / "out", s)
    assert all(f.exists() for f in files)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["goodput"] == pytest.approx(s["goodput"])
    assert "target goodput_vs_least_loaded" in comparison.table(s)


def test_a_comparison_sweeps_one_pool_size_and_names_bad_keys(tmp_path):
    with pytest.raises(ValueError, match="prefill.replicas"):
        _experiment(tmp_path, prefill={"hardware": "trn2.48xlarge", "tp": 64, "replicas": [1, 2]})
    with pytest.raises(ValueError, match="router_policy"):
        _experiment(tmp_path, router_policy=["fastest"])
    with pytest.raises(ValueError, match="quantile"):
        _experiment(tmp_path, quantile=1.5)


def test_cluster_yaml_defines_the_router_comparison():
    meta = yaml.safe_load((REPO / "cluster.yaml").read_text())["metadata"]
    exp = parse_experiments(meta, REPO / "cluster.yaml")["router-comparison"]
    assert isinstance(exp, RouterComparison) and set(exp.policies) == {"round_robin", "least_loaded", "cost", "sla"}
    assert min(exp.rate_factors) == 0.5 and max(exp.rate_factors) == 2.0


def test_capacity_is_the_slower_pool_and_scales_with_replicas():
    model = get_spec("llama-3.1-70b")
    pf = PoolSetup(make_deployment(model, get_profile("trn2.48xlarge"), tp=64), 1, 8, 8192)
    dc = PoolSetup(make_deployment(model, get_profile("cs3"), systems=4), 1, 64)
    one = capacity(pf, dc, [(1000, 200)])
    two = capacity(PoolSetup(pf.dep, 2, 8, 8192), dc, [(1000, 200)])
    assert one.rps == min(one.prefill_rps, one.decode_rps) and one.bottleneck in ("prefill", "decode")
    assert two.prefill_rps == pytest.approx(2 * one.prefill_rps) and two.decode_rps == one.decode_rps
    assert capacity(pf, dc, [(4000, 200)]).prefill_rps < one.prefill_rps  # longer prompts: fewer per second
    assert math.isfinite(one.rps) and "req/s" in one.describe()
    with pytest.raises(ValueError, match="lengths"):
        capacity(pf, dc, [])


def test_local_prefill_runs_sla_beside_its_disaggregated_ablation(tmp_path):
    exp = _experiment(tmp_path, router_policy=["sla"], rate_factors=[2.0], local_prefill_max_tokens=1024)
    assert exp.local_prefill_max_tokens == 1024
    variants = comparison.variants_of(exp, comparison.SimConfig(*comparison.pools(exp), comparison.workload(exp)[0].sla))
    assert {k: v.local_prefill_max_tokens for k, v in variants.items()} == {"sla": 1024, "sla_disaggregated": 0}
    assert all(v.router_policy == "sla" for v in variants.values())
    with pytest.raises(ValueError, match="local_prefill_max_tokens"):
        _experiment(tmp_path, local_prefill_max_tokens=-1)


def test_chunked_local_prefill_is_the_sla_runs_setting_only(tmp_path):
    exp = _experiment(tmp_path, router_policy=["sla"], local_prefill_max_tokens=1024, local_prefill_chunk_tokens=16)
    variants = comparison.variants_of(exp, comparison.SimConfig(*comparison.pools(exp), comparison.workload(exp)[0].sla))
    assert {k: v.local_prefill_chunk_tokens for k, v in variants.items()} == {"sla": 16, "sla_disaggregated": 0}
    with pytest.raises(ValueError, match="local_prefill_chunk_tokens"):
        _experiment(tmp_path, local_prefill_chunk_tokens=-1)
