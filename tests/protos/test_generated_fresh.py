"""The checked-in generated code matches what protos/generate.py produces from the .proto files."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("grpc_tools", reason="grpcio-tools (dev dependency) regenerates the protos")
_spec = importlib.util.spec_from_file_location("protos_generate", ROOT / "protos" / "generate.py")
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    fresh = generate.generate(tmp_path)
    checked_in = sorted(p.relative_to(generate.PROTO_ROOT) for p in generate.PROTO_ROOT.rglob("*")
                        if p.is_file() and p.name.endswith(generate.GENERATED_SUFFIXES))
    assert fresh == checked_in, "generated file set differs: run `make protos`"
    stale = [str(rel) for rel in fresh
             if (tmp_path / rel).read_bytes() != (generate.PROTO_ROOT / rel).read_bytes()]
    assert not stale, f"stale generated code in {stale}: run `make protos`"


def test_generated_imports_are_package_relative() -> None:
    from protos.disagg.v1 import inference_pb2, inference_pb2_grpc, kvtransfer_pb2

    assert inference_pb2.DESCRIPTOR.name == "disagg/v1/inference.proto"
    assert kvtransfer_pb2.DESCRIPTOR.package == "disagg.v1"
    assert hasattr(inference_pb2_grpc, "InferenceServicer")


def test_optional_fields_distinguish_unset_from_zero() -> None:
    from protos.disagg.v1 import inference_pb2 as pb

    s = pb.SamplingParams()
    assert not s.HasField("temperature")
    s.temperature = 0.0
    assert s.HasField("temperature")
