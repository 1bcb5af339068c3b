"""Conversions from the wire messages (disagg.v1) to the client library's typed results and errors."""
from __future__ import annotations

import grpc

from model.finish import FinishReason
from orchestrator.client.types import (ClientError, Final, ModelInfo, PoolInfo, Prediction, ServerInfo, SLAClass,
                                       Timings, Usage, WorkerInfo, error_for)
from protos.disagg.v1 import inference_pb2 as pb


FINISH_TO_PB = {FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
                FinishReason.ABORT: pb.FINISH_REASON_ABORT}  # ERROR never ends in a Final: it is an Error
_FINISH_FROM_PB = {v: k for k, v in FINISH_TO_PB.items()}


def finish_reason_from_pb(value: int) -> FinishReason:
    """ValueError for a reason this client does not know (UNSPECIFIED included)."""
    reason = _FINISH_FROM_PB.get(value)
    if reason is None:
        raise ValueError(f"finish_reason: {value} is not FINISH_REASON_STOP, _LENGTH or _ABORT")
    return reason


def error_from_rpc(e: grpc.RpcError) -> ClientError:
    return error_for(e.code(), e.details() or "")


def _worker_kind(value: int) -> str:
    return pb.WorkerKind.Name(value).removeprefix("WORKER_KIND_").lower()


def final_from_pb(request_id: str, f: pb.Final) -> Final:
    """Final.prediction is None when the server sent none."""
    t, p = f.timings, f.prediction
    prediction = Prediction(p.ttft_ms, p.tpot_ms, p.ttft_bound_ms, p.tpot_bound_ms, p.quantile) \
        if f.HasField("prediction") else None
    return Final(request_id, finish_reason_from_pb(f.finish_reason),
                 Usage(f.usage.prompt_tokens, f.usage.completion_tokens),
                 Timings(t.queued_ms, t.prefill_ms, t.transfer_ms, t.ttft_ms, t.mean_tpot_ms, t.e2e_ms),
                 f.prefill_worker, f.decode_worker, prediction, f.migrations)


def model_info_from_pb(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(m.name, m.n_layers, m.context_length, m.vocab_size, m.max_tokens_limit,
                     tuple(SLAClass(c.name, c.ttft_ms, c.tpot_ms) for c in m.sla_classes))


def server_info_from_pb(s: pb.ServerInfo) -> ServerInfo:
    def worker(w: pb.WorkerInfo) -> WorkerInfo:
        return WorkerInfo(w.worker_id, _worker_kind(w.kind), w.hardware, w.load, w.active_requests, w.queued_requests,
                          w.kv_blocks_free, w.kv_blocks_total, w.healthy)

    return ServerInfo(s.version, s.model, tuple(PoolInfo(p.name, _worker_kind(p.kind), p.hardware,
                                                         tuple(worker(w) for w in p.workers)) for p in s.pools))
