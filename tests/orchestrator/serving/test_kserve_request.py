"""The KServe door's translation: ModelInferRequests into GenerateRequests, refusals naming the tensor."""
from __future__ import annotations

import grpc
import pytest

from orchestrator.serving.kserve_request import decode_bytes_tensor, encode_bytes_tensor, infer_request
from orchestrator.serving.validation import RequestInvalid
from protos.kserve.v2 import grpc_service_pb2 as kpb


def _req(**parameters) -> kpb.ModelInferRequest:
    r = kpb.ModelInferRequest(model_name="m", id="r1")
    r.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    r.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
    r.raw_input_contents.extend([encode_bytes_tensor(["héllo".encode()]), (7).to_bytes(4, "little")])
    for k, v in parameters.items():
        setattr(r.parameters[k], {bool: "bool_param", int: "int64_param", float: "double_param",
                                  str: "string_param"}[type(v)], v)
    return r


def test_bytes_tensors_round_trip():
    items = [b"", b"a", "ü".encode() * 3]
    assert decode_bytes_tensor(encode_bytes_tensor(items)) == items
    with pytest.raises(ValueError):
        decode_bytes_tensor(b"\x05\x00\x00\x00ab")


def test_tensors_and_parameters_become_the_generate_request():
    t = infer_request(_req(temperature=0.5, seed=3, stop="\n", sla_class="batch", ttft_ms=900,
                           triton_enable_empty_final_response=True), streaming_call=True)
    m = t.msg
    assert (m.model, m.request_id, m.text, m.sampling.max_tokens) == ("m", "r1", "héllo", 7)
    assert (m.sampling.temperature, m.sampling.seed, list(m.sampling.stop)) == (0.5, 3, ["\n"])
    assert (m.sla.sla_class, m.sla.ttft_ms) == ("batch", 900.0) and t.empty_final and not t.stream


def test_contents_instead_of_raw_bytes_are_read_too():
    r = kpb.ModelInferRequest(model_name="m")
    r.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"hi")
    r.inputs.add(name="stream", datatype="BOOL", shape=[1]).contents.bool_contents.append(True)
    t = infer_request(r, streaming_call=True)
    assert t.msg.text == "hi" and t.stream and not t.msg.sampling.HasField("max_tokens")


@pytest.mark.parametrize("edit, named", [
    (lambda r: r.inputs[0].__setattr__("datatype", "FP32"), "inputs.text_input"),
    (lambda r: r.inputs[0].shape.append(2), "inputs.text_input"),
    (lambda r: r.inputs.add(name="beam_width", datatype="INT32", shape=[1]), "inputs.beam_width"),
    (lambda r: r.raw_input_contents.__setitem__(1, b"\x01"), "inputs.max_tokens"),
    (lambda r: r.raw_input_contents.__setitem__(0, encode_bytes_tensor([b"\xff"])), "inputs.text_input"),
    (lambda r: r.parameters["top_k"].__setattr__("int64_param", 5), "parameters.top_k"),
    (lambda r: r.parameters["temperature"].__setattr__("string_param", "hot"), "parameters.temperature"),
    (lambda r: r.outputs.add(name="logits"), "outputs.logits"),
])
def test_bad_requests_name_the_tensor_or_parameter(edit, named):
    r = _req()
    edit(r)
    with pytest.raises(RequestInvalid) as e:
        infer_request(r, streaming_call=False)
    assert e.value.code is grpc.StatusCode.INVALID_ARGUMENT and str(e.value).startswith(named)


def test_stream_true_needs_the_streaming_call_and_an_unknown_version_is_not_found():
    r = _req()
    r.inputs.add(name="stream", datatype="BOOL", shape=[1])
    r.raw_input_contents.append(b"\x01")
    with pytest.raises(RequestInvalid, match="inputs.stream"):
        infer_request(r, streaming_call=False)
    r = _req()
    r.model_version = "3"
    with pytest.raises(RequestInvalid) as e:
        infer_request(r, streaming_call=True)
    assert e.value.code is grpc.StatusCode.NOT_FOUND
