"""The OpenAI door's translation: JSON bodies into GenerateRequests, refusals into OpenAI statuses."""
from __future__ import annotations

import grpc
import pytest

from orchestrator.serving.openai_request import (BodyInvalid, chat_request, completion_request, http_status,
                                                 openai_param)

M = "SmolLM2-135M-Instruct"


def test_a_completion_body_becomes_the_same_generate_request_fields():
    t = completion_request({"model": M, "prompt": "Hi", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
                            "seed": 3, "stop": "\n", "stream": True, "stream_options": {"include_usage": True},
                            "sla_class": "batch", "ignore_eos": True},
                           {"x-slo-ttft-ms": "1500", "x-slo-tpot-ms": "80.5"})
    m = t.msg
    assert (m.model, m.text, m.sampling.max_tokens, m.sampling.temperature, m.sampling.top_p, m.sampling.seed) == \
        (M, "Hi", 7, 0.5, 0.9, 3)
    assert list(m.sampling.stop) == ["\n"] and m.sampling.ignore_eos
    assert (m.sla.sla_class, m.sla.ttft_ms, m.sla.tpot_ms) == ("batch", 1500.0, 80.5)
    assert t.stream and t.include_usage


def test_unset_options_stay_unset_for_the_validator_defaults():
    m = completion_request({"model": M, "prompt": [1, 2, 3]}, {}).msg
    assert list(m.token_ids.ids) == [1, 2, 3]
    assert not m.sampling.HasField("max_tokens") and not m.sampling.HasField("temperature")
    assert not m.sla.HasField("ttft_ms") and m.sla.sla_class == ""


def test_chat_messages_become_the_chat_prompt_and_max_completion_tokens_counts():
    t = chat_request({"model": M, "max_completion_tokens": 5, "messages": [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]}, {})
    assert [(c.role, c.content) for c in t.msg.chat.messages] == [("system", "Be terse."), ("user", "Hi there")]
    assert t.msg.sampling.max_tokens == 5 and not t.stream


@pytest.mark.parametrize("body, param", [
    ({"model": M, "prompt": "x", "n": 2}, "n"),
    ({"model": M, "prompt": "x", "logprobs": 3}, "logprobs"),
    ({"model": M, "messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    ({"model": M, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": M, "prompt": "x", "echo": True}, "echo"),
    ({"model": M, "prompt": ["a", "b"]}, "prompt"),
    ({"model": M, "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"model": M, "prompt": "x", "max_tokens": 2**40}, "max_tokens"),
    ({"model": M, "prompt": "x", "temperature": True}, "temperature"),
    ({"model": M, "prompt": "x", "stop": [1]}, "stop"),
    ({"model": M, "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x"}, "model"),
    ({"model": M}, "prompt"),
    ({"model": M, "messages": []}, "messages"),
    ({"model": M, "messages": [{"role": "user", "content": {"a": 1}}]}, "messages[0].content"),
    ({"model": M, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
      "max_completion_tokens": 4}, "max_completion_tokens"),
    ([1, 2], "body"),
])
def test_bad_bodies_are_refused_naming_the_option(body, param):
    translate = chat_request if isinstance(body, dict) and "messages" in body else completion_request
    with pytest.raises(BodyInvalid) as e:
        translate(body, {})
    assert e.value.param == param and str(e.value).startswith(f"{param}: ") and e.value.status == 400


@pytest.mark.parametrize("header, value", [("x-slo-ttft-ms", "soon"), ("x-slo-tpot-ms", "-3"),
                                           ("x-slo-ttft-ms", "nan")])
def test_bad_sla_headers_are_refused_naming_the_header(header, value):
    with pytest.raises(BodyInvalid) as e:
        completion_request({"model": M, "prompt": "x"}, {header: value})
    assert e.value.param == header


def test_validator_messages_name_the_openai_parameter():
    assert openai_param("sampling.max_tokens: 9999 exceeds the limit 1024") == "max_tokens"
    assert openai_param("prompt.chat.messages[1].role: 'tool' is not one of system") == "messages[1].role"
    assert openai_param("sla.ttft_ms: must be positive") == "x-slo-ttft-ms"
    assert openai_param("model: unknown model 'x'") == "model"
    assert openai_param("no pair is predicted to meet the SLA: predicted") is None


@pytest.mark.parametrize("code, message, status", [
    (grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: bad", 400),
    (grpc.StatusCode.OUT_OF_RANGE, "sampling.max_tokens: too many", 400),
    (grpc.StatusCode.NOT_FOUND, "model: unknown model 'x'", 404),
    (grpc.StatusCode.NOT_FOUND, "sla.sla_class: unknown class 'x'", 400),
    ("RESOURCE_EXHAUSTED", "no pair is predicted to meet the SLA", 429),
    ("UNAVAILABLE", "server: shutting down", 503),
    ("UNAUTHENTICATED", "authorization: missing", 401),
    ("INTERNAL", "boom", 500),
])
def test_grpc_statuses_map_to_http_statuses(code, message, status):
    assert http_status(code, message)[0] == status
