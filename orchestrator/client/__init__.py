"""The gRPC client library (disagg.v1.Inference): sync `Client`, asyncio `AsyncClient`, typed results and errors.

Imports no Ray and nothing of the serving side, so an application can depend on it alone.
"""
from orchestrator.client.grpc_client import AsyncClient, AsyncGenerateStream, Client, GenerateStream, build_request
from orchestrator.client.timing import StreamTiming
from orchestrator.client.types import (
    AlreadyExists, Cancelled, Chunk, ClientError, Completion, DeadlineExceeded, Final, Internal, InvalidArgument,
    ModelInfo, NotFound, OutOfRange, PermissionDenied, PoolInfo, Prediction, ResourceExhausted, ServerInfo, SLAClass,
    Timings, Unauthenticated, Unavailable, Usage, WorkerInfo, error_for,
)

__all__ = [
    "AsyncClient", "AsyncGenerateStream", "Client", "GenerateStream", "build_request", "StreamTiming",
    "AlreadyExists", "Cancelled", "Chunk", "ClientError", "Completion", "DeadlineExceeded", "Final", "Internal",
    "InvalidArgument", "ModelInfo", "NotFound", "OutOfRange", "PermissionDenied", "PoolInfo", "Prediction",
    "ResourceExhausted", "ServerInfo", "SLAClass", "Timings", "Unauthenticated", "Unavailable", "Usage", "WorkerInfo",
    "error_for",
]
