"""Our KServe v2 protos speak tritonclient's wire: every field we define has the spec's name, number and
type, and both generated copies of the `inference` package import into one process."""
from __future__ import annotations

import pytest

pytest.importorskip("tritonclient.grpc")

import tritonclient.grpc  # noqa: E402,F401 - first, into protobuf's default pool
from tritonclient.grpc import model_config_pb2 as triton_config  # noqa: E402
from tritonclient.grpc import service_pb2 as triton_service  # noqa: E402

from protos.kserve.v2 import grpc_service_pb2, model_config_pb2  # noqa: E402


def _messages(file_descriptor):
    def walk(m):
        yield m
        for n in m.nested_types:
            yield from walk(n)
    for m in file_descriptor.message_types_by_name.values():
        yield from walk(m)


@pytest.mark.parametrize("ours, theirs", [(grpc_service_pb2, triton_service), (model_config_pb2, triton_config)])
def test_every_field_matches_the_spec(ours, theirs):
    checked = 0
    for m in _messages(ours.DESCRIPTOR):
        spec = theirs.DESCRIPTOR.pool.FindMessageTypeByName(m.full_name)
        for f in m.fields:
            s = spec.fields_by_name[f.name]
            assert (f.number, f.type, f.is_repeated) == (s.number, s.type, s.is_repeated), f"{m.full_name}.{f.name}"
            checked += 1
    assert checked >= 15  # every field of ours was compared


def test_the_service_has_the_spec_methods_and_streaming():
    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    spec = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == spec.full_name == "inference.GRPCInferenceService"
    for m in ours.methods:
        s = spec.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming) == \
            (s.input_type.full_name, s.output_type.full_name, s.client_streaming, s.server_streaming)


def test_a_request_round_trips_between_the_two_copies():
    r = grpc_service_pb2.ModelInferRequest(model_name="m", id="7", raw_input_contents=[b"\x01\x00\x00\x00a"])
    r.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    r.parameters["temperature"].double_param = 0.5
    theirs = triton_service.ModelInferRequest.FromString(r.SerializeToString())
    assert theirs.inputs[0].name == "text_input" and theirs.parameters["temperature"].double_param == 0.5
    assert grpc_service_pb2.ModelInferRequest.FromString(theirs.SerializeToString()) == r
