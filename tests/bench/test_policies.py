"""bench.policies without Ray: the two-class workload it replays and the table it prints."""
import pytest

from bench.policies import table, workload
from orchestrator.core.config import load_config
from tests.paths import REPO, shared_data


def test_the_live_comparison_merges_both_classes_traces_in_arrival_order():
    shared_data("azure-llm-2023/AzureLLMInferenceTrace_code.csv")
    cfg = load_config(REPO / "cluster.yaml")
    rows = workload(cfg, 40)
    assert len(rows) == 40 and {c for c, _ in rows} == {"interactive", "batch"}
    arrivals = [r.arrival_s for _, r in rows]
    assert arrivals == sorted(arrivals)
    assert all(c in cfg.sla_classes for c, _ in rows)  # live targets of the same names


def test_the_table_shows_each_policys_goodput_and_classes():
    run = {"policy": "sla", "goodput_rps": 1.25, "prediction_error": {"ttft_p50": 0.1, "ttft_p90": None,
                                                                      "tpot_p50": 0.05, "tpot_p90": 0.2},
           "classes": {"interactive": {"admitted_attainment": 1.0, "rejected": 2},
                       "batch": {"admitted_attainment": None, "rejected": 5}},
           "cpu_share": {"prefill": {"p10": 0.5, "p50": 0.9, "p90": 1.0},
                         "decode": {"p10": None, "p50": None, "p90": None}}}
    text = table({"classes": {"interactive": {}, "batch": {}}, "runs": [run]})
    assert "| sla | 1.25 | 100%, 2 | -, 5 | 10% / - | 5% / 20% | 90% (50%), - (-) |" in text


def test_a_class_without_live_targets_is_named():
    cfg = load_config(REPO / "cluster.yaml")
    from dataclasses import replace
    shared_data("azure-llm-2023/AzureLLMInferenceTrace_code.csv")
    with pytest.raises(ValueError, match="batch"):
        workload(replace(cfg, sla_classes={"interactive": cfg.sla_classes["interactive"]}), 40)


def test_live_prediction_error_and_coverage():
    from bench.live import Outcome, prediction_error

    def o(pred, bound, actual):
        return Outcome("r", 10, 5, actual, 50.0, 1.0, True, predicted_ttft_ms=pred, predicted_tpot_ms=50.0,
                       bound_ttft_ms=bound, bound_tpot_ms=40.0)
    # the third has no prediction: it is left out
    got = prediction_error([o(90.0, 95.0, 100.0), o(150.0, 160.0, 100.0), o(None, None, 100.0)])
    assert got["ttft_p50"] == pytest.approx(0.3) and got["ttft_coverage"] == 0.5  # 100 ms is above 95, within 160
    assert got["tpot_p50"] == 0.0 and got["tpot_coverage"] == 0.0  # 50 ms actual above the 40 ms bound
