"""Fixtures: a small layout, random KV, and both transports (in-process and real gRPC on 127.0.0.1)."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import pytest

from kvtransfer.array_sink import ArraySink
from kvtransfer.grpc_backend import GrpcTransferBackend, start_kv_server
from kvtransfer.inprocess import InProcessBackend
from kvtransfer.layout import KVLayout
from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import SenderConfig, TransferBackend

LAYOUT = KVLayout(n_layers=4, n_kv_heads=3, head_dim=16)
N_TOKENS = 50


def make_kv(n_tokens: int = N_TOKENS, layout: KVLayout = LAYOUT, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shape = (n_tokens, layout.n_kv_heads, layout.head_dim)
    return [(rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32))
            for _ in range(layout.n_layers)]


def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


class Harness:
    """A sink, its receiver and a backend that reaches it; `wrap` lets a test tamper with the frames."""

    def __init__(self, kind: str, sink, config: SenderConfig, wrap=None):
        self.sink, self.receiver = sink, KVReceiver(sink)
        base = GrpcTransferBackend if kind == "grpc" else InProcessBackend
        wrap = wrap or (lambda frames: frames)

        class Backend(base):
            def open_call(self, target, frames, timeout_s):
                return super().open_call(target, wrap(frames), timeout_s)

        if kind == "grpc":
            self.server, port = start_kv_server(self.receiver)
            self.backend: TransferBackend = Backend(config)
            self.target = f"127.0.0.1:{port}"
        else:
            self.server = None
            self.backend = Backend(self.receiver, config)
            self.target = "decode-0"

    def close(self) -> None:
        self.backend.close()
        if self.server is not None:
            self.server.stop(0)


@pytest.fixture(params=["inprocess", "grpc"])
def harness(request):
    made: list[Harness] = []

    def make(sink=None, config: SenderConfig | None = None, wrap=None) -> Harness:
        h = Harness(request.param, sink if sink is not None else ArraySink(LAYOUT, 64, slots=2),
                    config or SenderConfig(chunk_bytes=4096, window=4), wrap)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()
