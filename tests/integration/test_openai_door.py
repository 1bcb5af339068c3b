"""The OpenAI-compatible HTTP door of a real deployment (1 prefill + 1 decode worker on a local Ray),
driven by the unmodified `openai` client: sync and async, chat and completions, streaming and not,
each refusal as the client's own exception; raw HTTP for what the client cannot send. Nothing leaks."""
from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import time
from urllib.parse import urlparse

import openai
import pytest

from orchestrator import client as cl
from tests.integration.stack import ROOT, cluster_tree, config_of, running, wait_kv_free

pytestmark = pytest.mark.integration
KEY = "door-test-key-0123456789"
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tree = cluster_tree()
    tree["metadata"]["pools"]["decode"]["kv_capacity_tokens"] = 4096
    tree["metadata"]["frontend"]["max_message_bytes"] = 64 * 1024  # the oversized-body test stays small
    tree["metadata"]["sla_classes"]["standard"].update(ttft_ms=30000, tpot_ms=2000)  # a loaded host admits all
    with running(config_of(tree, tmp_path_factory.mktemp("cfg")), api_key=KEY) as r:
        yield r


@pytest.fixture(scope="module")
def grpc_client(run):
    with cl.Client(run.dep.target, token=KEY, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def oa(run):
    with openai.OpenAI(base_url=run.dep.http_url, api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def _raw(run, method: str, path: str, body: bytes, headers: dict) -> tuple[int, dict]:
    """One plain HTTP call to the door: (status, JSON body)."""
    url = urlparse(run.dep.http_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}", **headers})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_models_lists_the_served_model_and_an_unknown_one_is_not_found(oa):
    assert [m.id for m in oa.models.list().data] == [MODEL]
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("gpt-4o")


def test_a_completion_has_the_grpc_apis_tokens_and_usage(oa, grpc_client):
    prompt = "The capital of France is"
    got = oa.completions.create(model=MODEL, prompt=prompt, max_tokens=6)
    ref = grpc_client.complete(prompt=prompt, max_tokens=6)
    assert got.object == "text_completion" and got.choices[0].text == ref.text
    assert got.choices[0].finish_reason in ("stop", "length")
    assert got.usage.completion_tokens == ref.final.usage.completion_tokens <= 6
    assert got.usage.prompt_tokens == ref.final.usage.prompt_tokens > 0


def test_a_streamed_chat_equals_the_whole_one_and_ends_with_usage(oa):
    messages = [{"role": "user", "content": "Name one river."}]
    whole = oa.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=8)
    chunks = list(oa.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True,
                                             stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.role == "assistant" and text == whole.choices[0].message.content != ""
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_the_async_client_streams_completions_and_chats_at_once(run):
    async def main():
        async with openai.AsyncOpenAI(base_url=run.dep.http_url, api_key=KEY, max_retries=0, timeout=120) as c:
            async def completion(i):
                stream = await c.completions.create(model=MODEL, prompt=f"Count to {i}:", max_tokens=5, stream=True)
                return "".join([ch.choices[0].text async for ch in stream])

            async def chat(i):
                r = await c.chat.completions.create(model=MODEL, max_tokens=5, seed=i, temperature=0.7,
                                                    messages=[{"role": "user", "content": f"Say {i}."}])
                return r.choices[0].message.content

            return await asyncio.gather(*(completion(i) for i in range(3)), *(chat(i) for i in range(3)))

    texts = asyncio.run(main())
    assert len(texts) == 6 and all(isinstance(t, str) and t for t in texts)


@pytest.mark.parametrize("kw, param", [({"n": 2}, "n"), ({"logprobs": True}, "logprobs"),
                                       ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                                       ({"max_tokens": 100000}, "max_tokens"),
                                       ({"temperature": -1}, "temperature")])
def test_unsupported_and_out_of_range_options_are_400s_naming_them(oa, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], **kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param and param in e.value.message


def test_refusals_come_as_the_clients_own_exceptions(run, oa):
    with pytest.raises(openai.NotFoundError) as e:
        oa.completions.create(model="gpt-4o", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with openai.OpenAI(base_url=run.dep.http_url, api_key="wrong-key", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    for header, value in (("x-slo-ttft-ms", "soon"), ("x-slo-tpot-ms", "0")):
        with pytest.raises(openai.BadRequestError) as e:
            oa.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_headers={header: value})
        assert e.value.body["param"] == header
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"sla_class": "gold"})
    assert e.value.body["param"] == "sla_class"
    for i in range(6):  # a cold router places what it cannot judge yet: let it observe a few prefills first
        oa.completions.create(model=MODEL, prompt=f"Warm-up {i}:", max_tokens=2, extra_body={"sla_class": "batch"})
    with pytest.raises(openai.RateLimitError) as e:  # the router's early rejection, before any byte
        oa.completions.create(model=MODEL, prompt="x", max_tokens=2, stream=True,
                              extra_headers={"x-slo-ttft-ms": "0.001"})
    assert "floor" in e.value.message
    run.call(lambda: setattr(run.dep.frontend.service, "draining", True))
    try:
        with pytest.raises(openai.InternalServerError) as e:
            oa.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert e.value.status_code == 503
    finally:
        run.call(lambda: setattr(run.dep.frontend.service, "draining", False))


@pytest.mark.parametrize("body, headers, status, param", [
    (b'{"model": "smollm2-135m", "prompt": ', {"Content-Type": "application/json"}, 400, "body"),
    (b'{"model": "smollm2-135m", "prompt": "x"}', {"Content-Type": "text/plain"}, 415, "content-type"),
    (b'{"prompt": "' + b"a" * 100_000 + b'"}', {"Content-Type": "application/json"}, 413, "body"),
    (b'\xff\xfe', {"Content-Type": "application/json"}, 400, "body"),
])
def test_malformed_bodies_get_openai_error_objects(run, body, headers, status, param):
    got, answer = _raw(run, "POST", "/v1/completions", body, headers)
    assert got == status and answer["error"]["param"] == param and answer["error"]["message"]


def test_an_unknown_path_is_a_404_error_object(run):
    status, answer = _raw(run, "GET", "/v1/embeddings", b"", {})
    assert status == 404 and "error" in answer


def _cancelled(run) -> float:
    registry = run.dep.frontend.service.metrics.registry
    return run.call(lambda: registry.get_sample_value("pdorch_requests_failed_total", {"code": "CANCELLED"}) or 0.0)


def test_a_client_that_disconnects_aborts_its_request_and_frees_kv(run, oa, grpc_client):
    before = _cancelled(run)
    stream = oa.completions.create(model=MODEL, prompt="Count from one to one thousand:", max_tokens=300,
                                   stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    assert wait_kv_free(grpc_client, timeout_s=20)
    end = time.monotonic() + 10
    while run.call(lambda: len(run.dep.frontend.service._running)) and time.monotonic() < end:
        time.sleep(0.1)
    assert run.call(lambda: len(run.dep.frontend.service._running)) == 0
    assert _cancelled(run) == before + 1  # it ended because the client left, not by finishing its 300 tokens
    ok = oa.completions.create(model=MODEL, prompt="After the cancel,", max_tokens=3)  # others unaffected
    assert ok.usage.completion_tokens >= 1 and wait_kv_free(grpc_client)


def _readme_blocks() -> dict[str, str]:
    """The README's OpenAI-door examples by language (the first of each after the section's heading)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("#### The OpenAI-compatible HTTP door"):]
    return {lang: section.split(f"```{lang}\n", 1)[1].split("```", 1)[0] for lang in ("bash", "python")}


def test_the_readme_examples_run_against_the_door(run, capsys):
    blocks, url = _readme_blocks(), run.dep.http_url
    assert "http://127.0.0.1:8000/v1" in blocks["bash"] and "http://127.0.0.1:8000/v1" in blocks["python"]
    curl = blocks["bash"].replace("http://127.0.0.1:8000/v1", url).replace(
        "curl -s ", f"curl -s -H 'Authorization: Bearer {KEY}' ", 1)
    answer = json.loads(subprocess.run(["bash", "-c", curl], capture_output=True, text=True, check=True,
                                       timeout=120).stdout)
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]
    code = blocks["python"].replace("http://127.0.0.1:8000/v1", url).replace(
        "unused-without-PDORCH_API_KEY", KEY)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "completion_tokens=" in printed and printed.split("\n")[0].strip()


def test_the_api_key_guards_the_kserve_door_on_the_grpc_port_too_but_not_its_health_calls(run):
    import numpy as np
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    text = tg.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"Hi"], dtype=object))
    with tg.InferenceServerClient(url=run.dep.target) as triton:
        with pytest.raises(InferenceServerException) as e:
            triton.infer(MODEL, [text])
        assert e.value.status() == "StatusCode.UNAUTHENTICATED"
        result = triton.infer(MODEL, [text], headers={"authorization": f"Bearer {KEY}"})
        assert result.as_numpy("text_output")[0]
        # health stays open, as Kubernetes probes call it without credentials; metadata does not
        assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(MODEL)
        with pytest.raises(InferenceServerException) as e:
            triton.get_server_metadata()
        assert e.value.status() == "StatusCode.UNAUTHENTICATED"
