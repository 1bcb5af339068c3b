"""gRPC transport: raw-bytes bidi stream with identity serializers on both ends (no protobuf payloads).

Sender: `GrpcTransferBackend(config).open(target, request_id, layout, n_tokens, deadline_s)`.
Receiver: `server, port = start_kv_server(sink)` inside the decode worker's process (127.0.0.1).
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent import futures
from typing import Iterable, Iterator

import grpc

from kvtransfer import wire
from kvtransfer.layout import KVLayout
from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import FrameCall, SenderConfig, TransferBackend
from kvtransfer.sink import KVSink
from kvtransfer.states import TransportError


class _GrpcCall:
    """Adapts a grpc stream-stream call to FrameCall: RpcError becomes TransportError."""

    __slots__ = ("_call",)

    def __init__(self, call):
        self._call = call

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._call
        except grpc.RpcError as e:
            raise TransportError(e.code().name, e.details() or "") from None

    def cancel(self) -> None:
        self._call.cancel()


class GrpcTransferBackend(TransferBackend):
    """One channel per target, reused by every transfer to that decode worker."""

    def __init__(self, config: SenderConfig | None = None, *, channel_options=wire.CHANNEL_OPTIONS):
        super().__init__(config)
        self._options = list(channel_options)
        self._stubs: dict[str, tuple[grpc.Channel, grpc.StreamStreamMultiCallable]] = {}
        self._lock = threading.Lock()

    def _stub(self, target: str) -> grpc.StreamStreamMultiCallable:
        with self._lock:
            if target not in self._stubs:
                channel = grpc.insecure_channel(target, options=self._options)
                # no serializers: frames and replies cross as raw bytes
                self._stubs[target] = (channel, channel.stream_stream(wire.FULL_METHOD))
            return self._stubs[target][1]

    def open_call(self, target: str, frames: Iterable[bytes], timeout_s: float) -> FrameCall:
        return _GrpcCall(self._stub(target)(iter(frames), timeout=timeout_s))

    def close(self) -> None:
        with self._lock:
            for channel, _ in self._stubs.values():
                channel.close()
            self._stubs.clear()


class _Prefetch:
    """Receives frames in its own thread, up to `depth` ahead, so receiving the next frame overlaps
    checking and writing this one (a sync gRPC handler otherwise receives one message at a time)."""

    def __init__(self, frames: Iterator[bytes], depth: int = 4):
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._depth, self._end, self._closed = depth, None, False
        threading.Thread(target=self._pump, args=(frames,), name="kv-recv-prefetch", daemon=True).start()

    def _pump(self, frames: Iterator[bytes]) -> None:
        end: BaseException = StopIteration()
        try:
            for frame in frames:
                with self._cond:
                    while len(self._items) >= self._depth and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                    self._items.append(frame)
                    self._cond.notify_all()
        except Exception as e:  # grpc.RpcError on cancel or deadline: re-raised in the handler
            end = e
        with self._cond:
            self._end = end
            self._cond.notify_all()

    def __iter__(self) -> Iterator[bytes]:
        while True:
            with self._cond:
                while not self._items and self._end is None:
                    self._cond.wait()
                if not self._items:
                    if isinstance(self._end, StopIteration):
                        return
                    raise self._end
                frame = self._items.popleft()
                self._cond.notify_all()
            yield frame

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._items.clear()
            self._cond.notify_all()


def kv_service_handler(receiver: KVReceiver, prefetch: int = 4) -> grpc.GenericRpcHandler:
    """The KVTransfer service as a generic handler (add it to any grpc.Server)."""

    def transfer(request_iterator, context: grpc.ServicerContext):
        frames = _Prefetch(request_iterator, prefetch)
        try:
            yield from receiver.handle(frames, context.add_callback)
        finally:
            frames.close()

    return grpc.method_handlers_generic_handler(
        wire.SERVICE, {wire.METHOD: grpc.stream_stream_rpc_method_handler(transfer)})


def start_kv_server(sink: KVSink | KVReceiver, host: str = "127.0.0.1", port: int = 0, *,
                    expected_layout: KVLayout | None = None, max_transfers: int = 16,
                    options=wire.CHANNEL_OPTIONS) -> tuple[grpc.Server, int]:
    """Serve KV transfers into `sink` from background threads; returns (server, bound port).

    Each open stream holds one of `max_transfers` threads; more concurrent transfers are refused
    with RESOURCE_EXHAUSTED. Stop with `server.stop(grace)`.
    """
    receiver = sink if isinstance(sink, KVReceiver) else KVReceiver(sink, expected_layout)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_transfers, thread_name_prefix="kv-recv"),
                         options=list(options), maximum_concurrent_rpcs=max_transfers)
    server.add_generic_rpc_handlers((kv_service_handler(receiver),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the KV server to {host}:{port}")
    server.start()
    return server, bound
