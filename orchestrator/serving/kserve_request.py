"""KServe v2 inference requests translated into the gRPC API's GenerateRequest, and text into output tensors.

Tensors are named as Triton's vLLM and TensorRT-LLM backends name them: text_input (BYTES), max_tokens
(INT32), stream (BOOL) in, text_output (BYTES) out. Sampling and SLA hints are request parameters.
Only the shape of the request is checked here; every rule about values stays in validation.py.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import grpc

from orchestrator.serving.validation import RequestInvalid
from protos.disagg.v1 import inference_pb2 as pb
from protos.kserve.v2 import grpc_service_pb2 as kpb

INPUTS = {"text_input": "BYTES", "max_tokens": "INT32", "stream": "BOOL"}
OUTPUT = "text_output"
EMPTY_FINAL = "triton_enable_empty_final_response"  # tritonclient's enable_empty_final_response
# parameter -> (kinds of InferParameter it takes, where it goes)
PARAMETERS = {"temperature": ("double_param", "int64_param"), "top_p": ("double_param", "int64_param"),
              "seed": ("int64_param", "uint64_param"), "stop": ("string_param",), "ignore_eos": ("bool_param",),
              "sla_class": ("string_param",), "ttft_ms": ("double_param", "int64_param"),
              "tpot_ms": ("double_param", "int64_param")}


def _invalid(message: str) -> RequestInvalid:
    return RequestInvalid(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True, slots=True)
class Translated:
    msg: pb.GenerateRequest
    stream: bool  # a response per token chunk (ModelStreamInfer only)
    empty_final: bool  # end with an empty response flagged final, as Triton does when asked


def decode_bytes_tensor(raw: bytes) -> list[bytes]:
    """Triton's BYTES wire format: each element a 4-byte little-endian length, then its bytes."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise ValueError("truncated length prefix")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise ValueError(f"element of {n} bytes runs past the end")
        out.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return out


def encode_bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _scalar(req: kpb.ModelInferRequest, index: int, tensor) -> object:
    """The one element of input `tensor` (raw_input_contents[index] or its contents)."""
    name, dtype = tensor.name, tensor.datatype
    if dtype != INPUTS[name]:
        raise _invalid(f"inputs.{name}: datatype must be {INPUTS[name]}, got {dtype!r}")
    count = 1
    for d in tensor.shape:
        count *= d
    if count != 1:
        raise _invalid(f"inputs.{name}: shape {list(tensor.shape)} holds {count} elements; one request carries one")
    if req.raw_input_contents:
        if index >= len(req.raw_input_contents):
            raise _invalid(f"raw_input_contents: {len(req.raw_input_contents)} given for {len(req.inputs)} inputs")
        raw = req.raw_input_contents[index]
        try:
            if dtype == "BYTES":
                items = decode_bytes_tensor(raw)
                if len(items) != 1:
                    raise ValueError(f"{len(items)} elements")
                return items[0]
            fmt = "<i" if dtype == "INT32" else "<?"
            if len(raw) != struct.calcsize(fmt):
                raise ValueError(f"{len(raw)} bytes for one {dtype}")
            return struct.unpack(fmt, raw)[0]
        except (ValueError, struct.error) as e:
            raise _invalid(f"inputs.{name}: malformed {dtype} data: {e}") from None
    field = {"BYTES": "bytes_contents", "INT32": "int_contents", "BOOL": "bool_contents"}[dtype]
    values = getattr(tensor.contents, field)
    if len(values) != 1:
        raise _invalid(f"inputs.{name}: contents.{field} holds {len(values)} elements, the shape one")
    return values[0]


def _parameters(req: kpb.ModelInferRequest, msg: pb.GenerateRequest) -> bool:
    """Sampling and SLA parameters into msg; returns whether an empty final response was asked for."""
    empty_final = False
    for key, p in req.parameters.items():
        kind = p.WhichOneof("parameter_choice")
        if key == EMPTY_FINAL:
            empty_final = kind == "bool_param" and p.bool_param
            continue
        if key.startswith("triton_") or key in ("priority", "timeout"):
            continue  # Triton's own scheduling hints: this server has its own (sla_class)
        if key not in PARAMETERS:
            raise _invalid(f"parameters.{key}: unknown; known: {', '.join(sorted(PARAMETERS))}")
        if kind not in PARAMETERS[key]:
            raise _invalid(f"parameters.{key}: must be one of {', '.join(PARAMETERS[key])}, got {kind}")
        value = getattr(p, kind)
        if key == "stop":
            msg.sampling.stop.append(value)
        elif key == "sla_class":
            msg.sla.sla_class = value
        elif key in ("ttft_ms", "tpot_ms"):
            setattr(msg.sla, key, float(value))
        elif key == "seed":
            if value > 2**63 - 1:
                raise _invalid(f"parameters.seed: {value} is out of range")
            msg.sampling.seed = value
        else:
            setattr(msg.sampling, key, value)
    return empty_final


def infer_request(req: kpb.ModelInferRequest, streaming_call: bool) -> Translated:
    """A GenerateRequest for `req`; RequestInvalid (INVALID_ARGUMENT) naming the tensor or parameter."""
    msg = pb.GenerateRequest(model=req.model_name, request_id=req.id)
    if req.model_version not in ("", "1"):
        raise RequestInvalid(grpc.StatusCode.NOT_FOUND, f"model_version: {req.model_version!r} unknown; served: '1'")
    seen = {}
    for i, tensor in enumerate(req.inputs):
        if tensor.name not in INPUTS:
            raise _invalid(f"inputs.{tensor.name}: unknown input; known: {', '.join(INPUTS)}")
        if tensor.name in seen:
            raise _invalid(f"inputs.{tensor.name}: given twice")
        seen[tensor.name] = _scalar(req, i, tensor)
    if "text_input" not in seen:
        raise _invalid("inputs.text_input: required (BYTES, shape [1])")
    try:
        msg.text = seen["text_input"].decode()
    except UnicodeDecodeError:
        raise _invalid("inputs.text_input: not valid UTF-8") from None
    if "max_tokens" in seen:
        msg.sampling.max_tokens = seen["max_tokens"]
    for out in req.outputs:
        if out.name != OUTPUT:
            raise _invalid(f"outputs.{out.name}: unknown output; this model has {OUTPUT}")
    empty_final = _parameters(req, msg)
    stream = bool(seen.get("stream", False))
    if stream and not streaming_call:
        raise _invalid("inputs.stream: true needs ModelStreamInfer (ModelInfer answers once)")
    return Translated(msg, stream, empty_final)
