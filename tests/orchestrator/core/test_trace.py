
import pytest

from orchestrator.core.trace import TraceError, TraceRequest, fit_trace, load_azure_trace
from tests.paths import shared_data

CONV = "azure-llm-2023/AzureLLMInferenceTrace_conv.csv"  # under ../shared/data (tests/paths.py)


def test_reads_the_real_azure_trace():
    reqs = load_azure_trace(shared_data(CONV), limit=200)
    assert len(reqs) == 200 and reqs[0].arrival_s == 0.0
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(reqs, reqs[1:]))
    assert all(r.prompt_tokens > 0 for r in reqs)


def test_fit_scales_lengths_and_rate():
    reqs = load_azure_trace(shared_data(CONV), limit=200)
    fitted, s = fit_trace(reqs, max_prompt=256, max_output=32, target_rate=4.0)
    assert max(r.prompt_tokens for r in fitted) <= 256 and max(r.output_tokens for r in fitted) <= 32
    assert min(r.prompt_tokens for r in fitted) >= 1
    rate = (len(fitted) - 1) / fitted[-1].arrival_s
    assert rate == pytest.approx(4.0, rel=1e-6)
    assert "req/s" in s.describe()


@pytest.mark.parametrize("text,message", [
    (None, r"t\.csv: cannot open"),
    ("a,b\n1,2\n", r"t\.csv: not an Azure LLM trace"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,12,x\n", r"t\.csv:2: malformed row"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n", r"t\.csv: trace holds no requests"),
])
def test_malformed_traces_name_the_file(tmp_path, text, message):
    if text is not None:
        (tmp_path / "t.csv").write_text(text)
    with pytest.raises(TraceError, match=message):
        load_azure_trace(tmp_path / "t.csv")


def test_mean_rate_and_time_scale_are_the_one_rescaling_rule():
    from orchestrator.core.trace import mean_rate, time_scale
    from orchestrator.simulator.workload import SimRequest, rescale

    arrivals = [0.0, 1.0, 2.0, 4.0]  # 3 gaps over 4 s
    assert mean_rate(arrivals) == 0.75
    assert mean_rate([3.0]) is None and mean_rate([2.0, 2.0]) is None and mean_rate([]) is None
    assert time_scale(arrivals, 1.5) == 0.5  # twice as fast: half the times
    assert time_scale([2.0, 2.0], 9.0) == 1.0  # no rate to scale from: unchanged
    with pytest.raises(ValueError, match="rate: must be > 0"):
        time_scale(arrivals, 0.0)
    reqs = [SimRequest(i, a, 10, 5) for i, a in enumerate(arrivals)]
    assert [r.arrival_s for r in rescale(reqs, 1.5)] == [0.0, 0.5, 1.0, 2.0]
    rows = [TraceRequest(a, 10, 5) for a in arrivals]
    fitted, s = fit_trace(rows, max_prompt=10, max_output=5, target_rate=1.5)
    assert [r.arrival_s for r in fitted] == [0.0, 0.5, 1.0, 2.0] and (s.source_rate, s.time_scale) == (0.75, 0.5)
