"""The three transports `python -m bench.kvtransfer` compares, each a receiving child process plus a sender.

- kvtransfer: the real sender -> gRPC -> receiver -> a decode worker's paged KV pool
  (decode.pool.PagedKVPool; this benchmark, not the kvtransfer library, imports decode/).
- kvtransfer-nopool: the same, except the pool skips the copy into its blocks (everything else - frames,
  checks, checksums, accounting - runs): a diagnostic row that isolates what the pool write costs.
- grpc-bare:  a gRPC bidi stream of the same raw-bytes chunks with the same channel options, nothing else.
              Its chunks are `bytes` built before the timed run, so it pays no per-frame copy from KV
              arrays (kvtransfer must: gRPC Python only sends `bytes`); the receiver only counts bytes.
- tcp:        a plain loopback socket, the receiver recv_into()s a reused buffer.
"""
from __future__ import annotations

import socket
import struct
import time
from concurrent import futures
from multiprocessing.connection import Connection

import grpc
import numpy as np

from kvtransfer import heap, wire
from decode.pool import PagedKVPool
from kvtransfer.grpc_backend import GrpcTransferBackend, start_kv_server
from kvtransfer.layout import KVLayout
from kvtransfer.sender import SenderConfig

BARE_METHOD = "/bench.Bare/Stream"


class RecyclingPool(PagedKVPool):
    """The decode pool, freeing a sequence as soon as it commits so repeated runs reuse its blocks."""

    def commit(self, request_id: str) -> None:
        super().commit(request_id)
        self.abort(request_id)  # a committed, unclaimed transfer: releases its blocks


class NoCopyPool(RecyclingPool):
    """RecyclingPool without the copy into the blocks: isolates the pool write's cost in the bench."""

    def store(self, request_id: str, layer: int, token_start: int, k: np.ndarray, v: np.ndarray) -> None:
        pass


def serve(kind: str, layout: KVLayout, n_tokens: int, streams: int, conn: Connection) -> None:
    """Child process: start one receiver, send its port to the parent, run until the parent says stop."""
    heap.keep_large_buffers()  # as the KV server does: every transport gets the same allocator settings
    if kind.startswith("kvtransfer"):
        block = 64  # the decode pool block size in cluster.yaml
        pool = NoCopyPool if kind == "kvtransfer-nopool" else RecyclingPool
        sink = pool(layout, block, capacity_tokens=(n_tokens // streams + 2 * block) * streams)
        server, port = start_kv_server(sink, max_transfers=max(4, streams))
    elif kind == "grpc-bare":
        server, port = _start_bare_server(streams)
    else:
        server, port = _start_tcp_server(streams)
    conn.send(port)
    while conn.recv() == "cpu":  # CPU seconds this process used so far; anything else means stop
        conn.send(time.process_time())
    server.stop(0) if kind != "tcp" else server.close()


def _start_bare_server(streams: int):
    def stream(request_iterator, context):
        total = 0
        for chunk in request_iterator:
            total += len(chunk)
        yield struct.pack("<Q", total)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max(4, streams)), options=list(wire.CHANNEL_OPTIONS))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Bare", {"Stream": grpc.stream_stream_rpc_method_handler(stream)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _start_tcp_server(streams: int):
    import threading

    listener = socket.create_server(("127.0.0.1", 0))

    def handle(sock: socket.socket) -> None:
        buf = memoryview(bytearray(1 << 20))
        with sock:
            while True:
                head = sock.recv(8, socket.MSG_WAITALL)
                if len(head) < 8:
                    return
                (left,) = struct.unpack("<Q", head)
                while left:
                    n = sock.recv_into(buf, min(len(buf), left))
                    if n == 0:
                        return
                    left -= n
                sock.sendall(b"\x01")

    def accept() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=handle, args=(sock,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener, listener.getsockname()[1]


class KVTransferClient:
    """Sends one request's layers through the real sender (one transfer per stream, each on its own channel)."""

    def __init__(self, port: int, layout: KVLayout, config: SenderConfig, streams: int):
        self.backends = [GrpcTransferBackend(config) for _ in range(streams)]
        self.target, self.layout, self.n = f"127.0.0.1:{port}", layout, 0

    def run(self, kv: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """kv: per stream a (n_layers, T, Hkv, Dh) K and V; all streams go concurrently."""
        transfers = []
        for backend, (k, v) in zip(self.backends, kv):
            self.n += 1
            transfers.append(backend.open(self.target, f"bench-{self.n}-{len(transfers)}", self.layout,
                                          k.shape[1], 60.0))
        for layer in range(self.layout.n_layers):  # layer by layer, as a prefill worker does
            for t, (k, v) in zip(transfers, kv):
                t.send_layer(layer, k[layer], v[layer])
        for t in transfers:
            r = t.commit()
            assert r.ok, r

    def close(self) -> None:
        for b in self.backends:
            b.close()


class BareClient:
    def __init__(self, port: int, streams: int):
        self.channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=list(wire.CHANNEL_OPTIONS))
                         for _ in range(streams)]
        self.stubs = [c.stream_stream(BARE_METHOD) for c in self.channels]

    def run(self, chunks: list[list[bytes]]) -> None:
        calls = [stub(iter(cs), timeout=60.0) for stub, cs in zip(self.stubs, chunks)]
        for call, cs in zip(calls, chunks):
            (total,) = struct.unpack("<Q", next(iter(call)))
            assert total == sum(len(c) for c in cs)

    def close(self) -> None:
        for c in self.channels:
            c.close()


class TcpClient:
    def __init__(self, port: int, streams: int):
        self.socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]
        for s in self.socks:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def run(self, chunks: list[list[memoryview]]) -> None:
        import threading

        def one(sock, cs):
            sock.sendall(struct.pack("<Q", sum(len(c) for c in cs)))
            for c in cs:
                sock.sendall(c)
            assert sock.recv(1) == b"\x01"

        threads = [threading.Thread(target=one, args=a) for a in zip(self.socks, chunks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def close(self) -> None:
        for s in self.socks:
            s.close()


def timed(fn, *args, receiver: Connection) -> tuple[float, float, float]:
    """(wall seconds, sender CPU seconds, receiver CPU seconds) of fn(*args)."""
    receiver.send("cpu")
    r0, c0, start = receiver.recv(), time.process_time(), time.perf_counter()
    fn(*args)
    wall, cpu = time.perf_counter() - start, time.process_time() - c0
    receiver.send("cpu")
    return wall, cpu, receiver.recv() - r0
