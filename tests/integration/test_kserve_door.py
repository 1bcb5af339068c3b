"""The KServe v2 / Triton gRPC door of a real deployment (1 prefill + 1 decode worker on a local Ray),
driven by the unmodified `tritonclient.grpc` in the same process as our own generated protocol code:
health, metadata, config, a whole and a streamed generation, refusals as InferenceServerException."""
from __future__ import annotations

import queue
import time

import numpy as np

import pytest
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException

from orchestrator import client as cl
from tests.integration.stack import ROOT, cluster_tree, config_of, running, wait_kv_free

pytestmark = pytest.mark.integration
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tree = cluster_tree()
    tree["metadata"]["pools"]["decode"]["kv_capacity_tokens"] = 4096
    tree["metadata"]["sla_classes"]["standard"].update(ttft_ms=30000, tpot_ms=2000)  # a loaded host admits all
    tree["metadata"]["frontend"]["http_port"] = None  # this door is on the gRPC port
    with running(config_of(tree, tmp_path_factory.mktemp("cfg")), http_port=None) as r:
        yield r


@pytest.fixture(scope="module")
def triton(run):
    with tg.InferenceServerClient(url=run.dep.target) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_client(run):
    with cl.Client(run.dep.target, timeout=120) as c:
        yield c


def _inputs(text: str, max_tokens: int, stream: bool | None = None) -> list:
    t = tg.InferInput("text_input", [1], "BYTES")
    t.set_data_from_numpy(np.array([text.encode()], dtype=object))
    m = tg.InferInput("max_tokens", [1], "INT32")
    m.set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
    out = [t, m]
    if stream is not None:
        s = tg.InferInput("stream", [1], "BOOL")
        s.set_data_from_numpy(np.array([stream], dtype=bool))
        out.append(s)
    return out


def test_health_metadata_and_config(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(MODEL) and not triton.is_model_ready("resnet50")
    assert triton.get_server_metadata().name == "pdorchestrator"
    meta = triton.get_model_metadata(MODEL)
    assert [(i.name, i.datatype) for i in meta.inputs] == [("text_input", "BYTES"), ("max_tokens", "INT32"),
                                                          ("stream", "BOOL")]
    assert [o.name for o in meta.outputs] == ["text_output"]
    config = triton.get_model_config(MODEL).config
    assert config.model_transaction_policy.decoupled and config.name == MODEL


def test_model_infer_has_the_grpc_apis_text(triton, grpc_client):
    prompt = "The capital of France is"
    result = triton.infer(MODEL, _inputs(prompt, 6), parameters={"temperature": 0.0, "sla_class": "standard"})
    got = result.as_numpy("text_output")[0].decode()
    assert got == grpc_client.complete(prompt=prompt, max_tokens=6).text != ""
    params = result.get_response().parameters
    assert params["triton_final_response"].bool_param and 1 <= params["completion_tokens"].int64_param <= 6


def test_a_streamed_generation_flags_only_its_last_response_final(triton):
    got: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        triton.async_stream_infer(MODEL, _inputs("Name three rivers.", 8, stream=True), request_id="s-1")
        responses = []
        while True:
            result, error = got.get(timeout=120)
            assert error is None, error
            responses.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        triton.stop_stream()
    assert len(responses) >= 2 and all(r.get_response().id == "s-1" for r in responses)
    assert not any(r.get_response().parameters["triton_final_response"].bool_param for r in responses[:-1])
    text = "".join(r.as_numpy("text_output")[0].decode() for r in responses)
    whole = triton.infer(MODEL, _inputs("Name three rivers.", 8)).as_numpy("text_output")[0].decode()
    assert text == whole != ""


def test_a_refused_request_in_a_stream_is_its_error_message_and_the_stream_goes_on(triton):
    got: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        triton.async_stream_infer(MODEL, _inputs("x", 100000, stream=True), request_id="bad")
        _, error = got.get(timeout=60)
        assert error is not None and "max_tokens" in error.message()
        triton.async_stream_infer(MODEL, _inputs("Hello", 2, stream=False), request_id="good")
        result, error = got.get(timeout=120)
        assert error is None and result.get_response().id == "good"
    finally:
        triton.stop_stream()


@pytest.mark.parametrize("call, status, named", [
    (lambda c: c.get_model_metadata("resnet50"), "StatusCode.NOT_FOUND", "resnet50"),
    (lambda c: c.infer("resnet50", _inputs("x", 2)), "StatusCode.NOT_FOUND", "model"),
    (lambda c: c.infer(MODEL, _inputs("x", 100000)), "StatusCode.OUT_OF_RANGE", "max_tokens"),
    (lambda c: c.infer(MODEL, _inputs("x", 2), parameters={"beam_width": 4}), "StatusCode.INVALID_ARGUMENT",
     "beam_width"),
    (lambda c: c.infer(MODEL, _inputs("x", 2), parameters={"temperature": "hot"}), "StatusCode.INVALID_ARGUMENT",
     "temperature"),
    (lambda c: c.infer(MODEL, _inputs("x", 2, stream=True)), "StatusCode.INVALID_ARGUMENT", "stream"),
    (lambda c: c.infer(MODEL, _inputs("x", 2)[1:]), "StatusCode.INVALID_ARGUMENT", "text_input"),
])
def test_refusals_are_inference_server_exceptions_with_the_status(triton, call, status, named):
    with pytest.raises(InferenceServerException) as e:
        call(triton)
    assert e.value.status() == status and named in e.value.message()


def test_statistics_count_finished_requests_and_nothing_leaks(triton, grpc_client):
    stats = triton.get_inference_statistics(MODEL).model_stats[0]
    assert stats.name == MODEL and stats.inference_count >= 3 and stats.inference_stats.success.ns > 0
    assert stats.inference_stats.fail.count >= 1
    assert 0 < time.time() * 1e3 - stats.last_inference < 3600e3  # ms since the epoch, of this run
    assert wait_kv_free(grpc_client)


def test_the_readme_example_runs_against_the_door(run, capsys):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("#### The KServe v2 / Triton gRPC door"):]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "127.0.0.1:50051" in code
    exec(compile(code.replace("127.0.0.1:50051", run.dep.target), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()
