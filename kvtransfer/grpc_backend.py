"""gRPC transport: raw-bytes bidi stream with identity serializers on both ends (no protobuf payloads).

Sender: `GrpcTransferBackend(config, token=...).open(target, request_id, layout, n_tokens, deadline_s)`.
Receiver: `server, port = start_kv_server(sink, token=...)` inside the decode worker's process (127.0.0.1).
With a token, the receiver ends every call that does not present it (kvtransfer/bearer.py) with
UNAUTHENTICATED before reading a frame, so nothing reaches the sink. TLS: pass gRPC credentials to both.
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent import futures
from typing import Iterable, Iterator

import grpc
import structlog

from kvtransfer import heap, wire
from kvtransfer.bearer import bearer_metadata, refusal
from kvtransfer.layout import KVLayout
from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import FrameCall, SenderConfig, TransferBackend
from kvtransfer.sink import KVSink
from kvtransfer.states import TransportError

log = structlog.get_logger("kvtransfer.grpc")


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
    """One channel per target, reused by every transfer to that decode worker. `token`: the receivers'
    transfer token, sent with every call; `credentials`: TLS to the receivers (None: plaintext)."""

    def __init__(self, config: SenderConfig | None = None, *, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None, channel_options=wire.CHANNEL_OPTIONS):
        super().__init__(config)
        heap.keep_large_buffers()  # every frame is a fresh 256 KB - 1 MB bytes (kvtransfer/heap.py)
        self._options = list(channel_options)
        self._metadata = bearer_metadata(token) if token else ()
        self._credentials = credentials
        self._stubs: dict[str, tuple[grpc.Channel, grpc.StreamStreamMultiCallable]] = {}
        self._lock = threading.Lock()

    def _stub(self, target: str) -> grpc.StreamStreamMultiCallable:
        with self._lock:
            if target not in self._stubs:
                channel = grpc.insecure_channel(target, options=self._options) if self._credentials is None \
                    else grpc.secure_channel(target, self._credentials, options=self._options)
                # no serializers: frames and replies cross as raw bytes
                self._stubs[target] = (channel, channel.stream_stream(wire.FULL_METHOD))
            return self._stubs[target][1]

    def open_call(self, target: str, frames: Iterable[bytes], timeout_s: float) -> FrameCall:
        return _GrpcCall(self._stub(target)(iter(frames), timeout=timeout_s, metadata=self._metadata))

    def close(self) -> None:
        with self._lock:
            for channel, _ in self._stubs.values():
                channel.close()
            self._stubs.clear()


def _pumped(replies: Iterator[bytes]) -> Iterator[bytes]:
    """Run the `replies` generator (it pulls, checks and writes frames) in its own thread and yield its
    replies here. A sync gRPC handler blocks while each reply is sent; this way sending an ack never
    stalls receiving, and there is one thread handoff per ack, not per frame (the former receive-ahead
    thread cost one per frame)."""
    items: deque = deque()
    cond = threading.Condition()
    end: list = []

    def pump() -> None:
        outcome: BaseException | None = None
        try:
            for r in replies:
                with cond:
                    items.append(r)
                    cond.notify()
        except BaseException as e:  # grpc.RpcError on cancel/deadline: re-raised in the handler
            outcome = e
        with cond:
            end.append(outcome)
            cond.notify()

    threading.Thread(target=pump, name="kv-recv", daemon=True).start()
    while True:
        with cond:
            while not items and not end:
                cond.wait()
            if items:
                r = items.popleft()
            elif end[0] is None:
                return
            else:
                raise end[0]
        yield r


def kv_service_handler(receiver: KVReceiver, token: str | None = None) -> grpc.GenericRpcHandler:
    """The KVTransfer service as a generic handler (add it to any grpc.Server); with a `token`, only
    calls presenting it reach the receiver."""
    if token == "":
        raise ValueError("token: must not be empty (None turns the check off)")

    def transfer(request_iterator, context: grpc.ServicerContext):
        reason = None if token is None else refusal(context.invocation_metadata(), token)
        if reason is not None:  # before the first frame is read: nothing reaches the sink
            log.warning("kv transfer refused", code="UNAUTHENTICATED", reason=reason, peer=context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"authorization: {reason}")
        yield from _pumped(receiver.handle(request_iterator, context.add_callback))

    return grpc.method_handlers_generic_handler(
        wire.SERVICE, {wire.METHOD: grpc.stream_stream_rpc_method_handler(transfer)})


def host_port(host: str, port: int) -> str:
    """A gRPC address: IPv6 hosts go in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def start_kv_server(sink: KVSink | KVReceiver, host: str = "127.0.0.1", port: int = 0, *,
                    expected_layout: KVLayout | None = None, max_transfers: int = 16,
                    token: str | None = None, credentials: grpc.ServerCredentials | None = None,
                    options=wire.CHANNEL_OPTIONS) -> tuple[grpc.Server, int]:
    """Serve KV transfers into `sink` from background threads; returns (server, bound port).

    `token`: the transfer token every sender must present (None: any process that reaches the port
    may write, for benches and tests); `credentials`: serve TLS (None: plaintext). Each open stream
    holds one of `max_transfers` threads; more concurrent transfers are refused with
    RESOURCE_EXHAUSTED. Stop with `server.stop(grace)`.
    """
    heap.keep_large_buffers()  # every received frame is a fresh 256 KB - 1 MB bytes (kvtransfer/heap.py)
    receiver = sink if isinstance(sink, KVReceiver) else KVReceiver(sink, expected_layout)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_transfers, thread_name_prefix="kv-recv"),
                         options=list(options), maximum_concurrent_rpcs=max_transfers)
    server.add_generic_rpc_handlers((kv_service_handler(receiver, token),))
    address = host_port(host, port)
    try:
        bound = server.add_insecure_port(address) if credentials is None \
            else server.add_secure_port(address, credentials)
    except RuntimeError:  # gRPC says only "Failed to bind"
        raise OSError(f"cannot bind the KV server to {address}") from None
    server.start()
    return server, bound
