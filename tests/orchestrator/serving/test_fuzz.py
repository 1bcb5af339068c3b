"""Fuzzing the frontend: arbitrary GenerateRequest field values to validation, and raw bytes and
arbitrary requests to every method of a real frontend on 127.0.0.1 serving a real engine (a
PrefillWorker and a DecodeWorker over the in-process KV backend). Nothing crashes or hangs, every bad
input gets its own status with a message naming the field, never INTERNAL or UNKNOWN."""
from __future__ import annotations

import asyncio
import copy
import threading

import grpc
import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from decode.worker import DecodeWorker
from kvtransfer.inprocess import InProcessBackend
from kvtransfer.receiver import KVReceiver
from model.sampling import make_rng
from orchestrator.core.config import parse_config
from orchestrator.core.router import Router
from orchestrator.serving.engine import Engine
from orchestrator.serving.frontend import SERVICE, start_frontend
from orchestrator.serving.perfmodel import live_deployment
from orchestrator.serving.validation import RequestInvalid, RequestValidator
from orchestrator.serving.workers import DecodeHandle, LocalCalls, Pools, PrefillHandle
from prefill.worker import PrefillWorker
from protos.disagg.v1 import inference_pb2 as pb
from tests.paths import REPO

MAX_TOKENS = 4  # the config's limit (and so the default): every accepted request stays short
API_KEY = "fuzz-api-key-0123456789"
REFUSED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND}
CALL_ENDS = REFUSED | {grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED}
FIELDS = ("prompt", "sampling.", "sla.", "model", "request")  # what a refusal's message starts with
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    import yaml

    tree = copy.deepcopy(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    tree["metadata"]["model"]["max_tokens_limit"] = MAX_TOKENS
    tree["metadata"]["frontend"]["metrics_port"] = None
    tree["metadata"]["frontend"]["http_port"] = None
    tree["metadata"]["workload"]["trace"] = str(REPO / "cluster.yaml")  # any file: no trace is read here
    return parse_config(tree, tmp_path_factory.mktemp("cfg") / "cluster.yaml")


# -- strategies -------------------------------------------------------------------------------

i32 = st.integers(-2**31, 2**31 - 1)
floats = st.floats(allow_nan=True, allow_infinity=True)
words = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=30)
ROLES = ["system", "user", "assistant"]
# field -> (values a valid request may have, any value of the field's type); None leaves a field unset
FIELD_VALUES = {
    "prompt": (st.one_of(st.tuples(st.just("text"), words.filter(str.strip)),
                         st.tuples(st.just("token_ids"), st.lists(st.integers(0, 49151), min_size=1, max_size=12)),
                         st.tuples(st.just("chat"), st.lists(st.tuples(st.sampled_from(ROLES), words.filter(str.strip)),
                                                             min_size=1, max_size=3))),
               st.one_of(st.none(), st.tuples(st.just("text"), st.text(max_size=40)),
                         st.tuples(st.just("token_ids"), st.lists(i32, max_size=12)),
                         st.tuples(st.just("chat"), st.lists(st.tuples(st.text(max_size=8), st.text(max_size=30)),
                                                             max_size=3)))),
    "max_tokens": (st.one_of(st.none(), st.integers(1, MAX_TOKENS)), i32),
    "temperature": (st.one_of(st.none(), st.floats(0, 2)), floats),
    "top_p": (st.one_of(st.none(), st.floats(0.01, 1)), floats),
    "seed": (st.one_of(st.none(), st.integers(0, 2**63 - 1)), st.integers(-2**63, 2**63 - 1)),
    "stop": (st.lists(words, max_size=2), st.lists(st.text(max_size=4), max_size=2)),
    "ttft_ms": (st.one_of(st.none(), st.floats(1, 1e9)), floats),
    "tpot_ms": (st.one_of(st.none(), st.floats(1, 1e9)), floats),
    "sla_class": (st.sampled_from(["", "interactive", "standard", "batch"]), st.text(max_size=8)),
    "model": (st.sampled_from([None, "", "smollm2-135m"]), st.text(max_size=8)),
}


def _set(msg, **fields):
    for name, value in fields.items():
        if value is not None:
            setattr(msg, name, value)
    return msg


@st.composite
def generate_requests(draw):
    """GenerateRequests with up to two fields of any value and every other field valid (or unset), so
    both the refusals of each field and requests that run are reached."""
    broken = draw(st.sets(st.sampled_from(sorted(FIELD_VALUES)), max_size=2))
    v = {name: draw(values[name in broken]) for name, values in FIELD_VALUES.items()}
    msg = pb.GenerateRequest(request_id=draw(st.text(max_size=12)))
    if v["prompt"] is not None:
        kind, value = v["prompt"]
        if kind == "text":
            msg.text = value
        elif kind == "token_ids":
            msg.token_ids.ids.extend(value)
        else:
            msg.chat.SetInParent()
            for role, content in value:
                msg.chat.messages.add(role=role, content=content)
    _set(msg.sampling, max_tokens=v["max_tokens"], temperature=v["temperature"], top_p=v["top_p"], seed=v["seed"],
         ignore_eos=draw(st.booleans()))
    msg.sampling.stop.extend(v["stop"])
    _set(msg.sla, ttft_ms=v["ttft_ms"], tpot_ms=v["tpot_ms"], sla_class=v["sla_class"], priority=draw(i32))
    return _set(msg, model=v["model"])


# -- validation -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def validator(lm, cfg):
    return RequestValidator(cfg, lm.tokenizer, lm.weights.config.context_length)


@given(msg=generate_requests())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_validation_accepts_a_runnable_request_or_names_the_field(validator, msg):
    cfg, vocab_size = validator.cfg, validator.tokenizer.vocab_size
    try:
        req = validator.build_request(msg)
    except RequestInvalid as e:
        assert e.code in REFUSED and str(e).startswith(FIELDS), (e.code, str(e))
        return
    p = req.sampling
    p.validate(cfg.max_tokens_limit)
    make_rng(p)  # the workers sample with it
    assert req.prompt_ids and all(0 <= i < vocab_size for i in req.prompt_ids)
    assert req.prompt_tokens + p.max_tokens <= validator.context_length
    assert req.sla.ttft_ms > 0 and req.sla.tpot_ms > 0


# -- a real frontend --------------------------------------------------------------------------

class Served:
    """The frontend (twice: open, and behind an API key) over one in-process engine; asyncio in a thread."""

    def __init__(self, lm, cfg):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="fuzz-frontend", daemon=True).start()
        self.open, self.keyed = self._run(self._start(lm, cfg))
        self.channels = {name: grpc.insecure_channel(fe.target) for name, fe in (("open", self.open),
                                                                                   ("keyed", self.keyed))}

    def _run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self, lm, cfg):
        self.decode = DecodeWorker(capacity_tokens=2048, block_size=16, max_batch=8, blas_threads=1, loaded=lm)
        backend = InProcessBackend({"decode-0": KVReceiver(self.decode.kv_sink, expected_layout=self.decode.layout)})
        self.prefill = prefill = PrefillWorker("prefill-0", blas_threads=1, transfer_backend=backend, loaded=lm)
        pools = Pools(prefill={"prefill-0": PrefillHandle("prefill-0", LocalCalls(prefill))},
                      decode={"decode-0": DecodeHandle("decode-0", LocalCalls(self.decode))},
                      kv_targets={"decode-0": "decode-0"})
        self.engine = Engine(pools, Router("least_loaded"), live_deployment(cfg.model_name)[0], decode_max_batch=8)
        await self.decode.start()
        await self.engine.start()
        shape = lm.weights.config
        return [await start_frontend(cfg, self.engine, lm.tokenizer, shape.context_length, shape.n_layers,
                                     host="127.0.0.1", port=0, metrics_port=None, api_key=key)
                for key in (None, API_KEY)]

    async def _stop(self):
        for fe in (self.open, self.keyed):
            await fe.stop(0)
        await self.engine.stop()
        await self.prefill.close()
        await self.decode.close()

    def call(self, method: str, raw: bytes, frontend: str = "open") -> tuple[grpc.StatusCode, str, list]:
        """One call with raw request bytes: (status, details, responses); streams are read to the end."""
        channel = self.channels[frontend]
        path = f"/{SERVICE}/{method}"
        try:
            if method == "Generate":
                out = [pb.GenerateResponse.FromString(r) for r in channel.unary_stream(path)(raw, timeout=60)]
            else:
                out = [channel.unary_unary(path)(raw, timeout=60)]
        except grpc.RpcError as e:
            return e.code(), e.details() or "", []
        return grpc.StatusCode.OK, "", out

    def close(self):
        for c in self.channels.values():
            c.close()
        self._run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def served(lm, cfg):
    s = Served(lm, cfg)
    yield s
    s.close()


def check_generate(code: grpc.StatusCode, details: str, out: list) -> None:
    assert code in CALL_ENDS, (code, details)
    if code in REFUSED:
        assert details.startswith(FIELDS), details
    if code is grpc.StatusCode.OK:
        kinds = [r.WhichOneof("kind") for r in out]
        assert kinds and kinds[-1] in ("final", "error") and "final" not in kinds[:-1] and "error" not in kinds[:-1]
        errors = [r.error.code for r in out if r.WhichOneof("kind") == "error"]
        assert not set(errors) & {"INTERNAL", "UNKNOWN"}, [r.error for r in out if r.WhichOneof("kind") == "error"]


@given(raw=st.binary(max_size=200))
@FUZZ
def test_raw_bytes_to_generate(served, raw):
    check_generate(*served.call("Generate", raw))


@given(msg=generate_requests())
@FUZZ
def test_arbitrary_generate_requests_end_with_their_status(served, msg):
    check_generate(*served.call("Generate", msg.SerializeToString()))


@pytest.mark.parametrize("method", ["Abort", "GetModelInfo", "GetServerInfo"])
@given(raw=st.binary(max_size=200))
@FUZZ
def test_raw_bytes_to_the_unary_methods(served, method, raw):
    code, details, _ = served.call(method, raw)
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT} | (
        {grpc.StatusCode.NOT_FOUND} if method == "Abort" else set())
    assert code in allowed, (code, details)
    if code is not grpc.StatusCode.OK:
        assert details.startswith(("request", "request_id")), details


@pytest.mark.parametrize("method", ["Generate", "Abort", "GetModelInfo", "GetServerInfo"])
@given(raw=st.binary(max_size=100))
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_raw_bytes_without_the_api_key_are_unauthenticated(served, method, raw):
    code, details, _ = served.call(method, raw, frontend="keyed")
    assert code is grpc.StatusCode.UNAUTHENTICATED, (code, details)
    assert API_KEY not in details
