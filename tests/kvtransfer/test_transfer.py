"""Sender + receiver over both transports: round trip, failures, release on both sides, backpressure."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from kvtransfer import wire
from kvtransfer.array_sink import ArraySink
from kvtransfer.layout import KVLayout
from kvtransfer.sender import SenderConfig
from kvtransfer.sink import KVRefused
from kvtransfer.states import TransferState
from protos.disagg.v1 import kvtransfer_pb2 as pb
from tests.kvtransfer.conftest import LAYOUT, N_TOKENS, make_kv, wait_for


def send_all(h, request_id="r1", kv=None, deadline_s=5.0):
    kv = kv or make_kv()
    t = h.backend.open(h.target, request_id, LAYOUT, len(kv[0][0]), deadline_s)
    for layer, (k, v) in enumerate(kv):
        t.send_layer(layer, k, v)
    return t.commit()


@pytest.mark.parametrize("checksum", ["xxh3", "crc32", "adler32", "none"])
def test_round_trip_bytes_exact(harness, checksum):
    h = harness(config=SenderConfig(chunk_bytes=3000, window=4, checksum=checksum))
    kv = make_kv()
    result = send_all(h, kv=kv)
    assert result.ok and result.state is TransferState.COMMITTED, result
    assert result.payload_bytes == LAYOUT.bytes_for(N_TOKENS)
    assert result.chunks > LAYOUT.n_layers  # layers were split into several chunks
    k, v = h.sink.read("r1")
    for layer, (k0, v0) in enumerate(kv):
        assert np.array_equal(k[layer], k0) and np.array_equal(v[layer], v0)
    assert h.sink.events == [("open", "r1"), ("commit", "r1")]
    assert h.receiver.stats.committed == 1 and h.receiver.stats.active == 0


def test_layers_out_of_order_and_non_contiguous(harness):
    h = harness()
    kv = make_kv()
    t = h.backend.open(h.target, "r1", LAYOUT, N_TOKENS, 5.0)
    for layer in (2, 0, 3, 1):
        k, v = kv[layer]
        t.send_layer(layer, np.asfortranarray(k), v)
    assert t.commit().ok
    assert np.array_equal(h.sink.read("r1")[0][2], kv[2][0])


def _corrupt_chunk(n: int):
    def wrap(frames):
        for i, frame in enumerate(frames):
            if i == n:  # flip one payload byte of the n-th frame (frame 0 is the open)
                buf = bytearray(frame)
                buf[-5] ^= 0xFF
                frame = bytes(buf)
            yield frame
    return wrap


def test_corrupted_chunk_fails_and_releases(harness):
    h = harness(wrap=_corrupt_chunk(3))
    result = send_all(h)
    assert result.state is TransferState.FAILED
    assert result.error_code == "DATA_LOSS" and "checksum" in result.error
    assert ("abort", "r1") in h.sink.events and h.sink.free_slots == 2
    assert h.receiver.stats.active == 0


def test_xxh3_is_the_default_and_catches_corruption(harness):
    opened = []

    def spy(frames):
        for i, frame in enumerate(frames):
            if i == 0:
                opened.append(wire.decode(frame)[0].open.checksum)
            yield frame

    assert SenderConfig().checksum == "xxh3"
    h = harness(config=SenderConfig(chunk_bytes=4096, window=4), wrap=lambda frames: _corrupt_chunk(5)(spy(frames)))
    result = send_all(h)
    assert opened == [pb.CHECKSUM_XXH3_64]
    assert result.state is TransferState.FAILED
    assert result.error_code == "DATA_LOSS" and "checksum" in result.error and "seq 5" in result.error
    assert ("abort", "r1") in h.sink.events and h.sink.free_slots == 2
    assert h.receiver.stats.active == 0


def test_deadline_expiry_releases_both_sides(harness):
    h = harness()
    kv = make_kv()
    start = time.monotonic()
    t = h.backend.open(h.target, "r1", LAYOUT, N_TOKENS, 0.3)
    t.send_layer(0, *kv[0])  # the other layers never come
    result = t.commit()
    assert result.state is TransferState.FAILED
    assert result.error_code in ("DEADLINE_EXCEEDED", "FAILED_PRECONDITION")
    assert time.monotonic() - start < 2.0
    assert wait_for(lambda: ("abort", "r1") in h.sink.events and h.sink.free_slots == 2)


def test_deadline_expiry_while_streaming(harness):
    h = harness()
    kv = make_kv()
    t = h.backend.open(h.target, "r1", LAYOUT, N_TOKENS, 0.3)
    t.send_layer(0, *kv[0])
    t.send_layer(1, *kv[1])
    assert wait_for(lambda: t.state is TransferState.FAILED, 2.0)
    assert t.result().error_code == "DEADLINE_EXCEEDED"
    assert wait_for(lambda: ("abort", "r1") in h.sink.events and h.sink.free_slots == 2)
    assert t.send_layer(2, *kv[2]) is TransferState.FAILED  # later layers are dropped quietly


def test_abort_mid_transfer(harness):
    h = harness()
    kv = make_kv()
    t = h.backend.open(h.target, "r1", LAYOUT, N_TOKENS, 5.0)
    t.send_layer(0, *kv[0])
    assert wait_for(lambda: t.state is TransferState.TRANSFERRING)
    result = t.abort("client went away")
    assert result.state is TransferState.ABORTED
    assert wait_for(lambda: ("abort", "r1") in h.sink.events and h.sink.free_slots == 2)
    assert t.commit().state is TransferState.ABORTED
    assert t.abort().state is TransferState.ABORTED  # idempotent
    assert send_all(h, "r2").ok  # the receiver keeps serving


def test_layout_mismatch_refused_naming_field(harness):
    h = harness(sink=ArraySink(KVLayout(4, 3, 32), 64))
    result = send_all(h)
    assert result.state is TransferState.FAILED
    assert result.error_code == "INVALID_ARGUMENT" and "head_dim" in result.error
    assert h.sink.events == []


def test_sink_exhausted_surfaces_to_sender(harness):
    h = harness(sink=ArraySink(LAYOUT, 64, slots=1))
    assert send_all(h, "r1").ok  # holds the only slot
    result = send_all(h, "r2")
    assert result.state is TransferState.FAILED and result.error_code == "RESOURCE_EXHAUSTED"
    h.sink.release("r1")
    assert send_all(h, "r3").ok


def test_missing_layer_at_commit_fails_and_releases(harness):
    h = harness()
    kv = make_kv()
    t = h.backend.open(h.target, "r1", LAYOUT, N_TOKENS, 5.0)
    t.send_layer(0, *kv[0])
    result = t.commit()
    assert result.state is TransferState.FAILED and result.error_code == "FAILED_PRECONDITION"
    assert "[1, 2, 3]" in result.error
    assert wait_for(lambda: ("abort", "r1") in h.sink.events)


def test_send_layer_validates_arguments(harness):
    h = harness()
    t = h.backend.open(h.target, "r1", LAYOUT, N_TOKENS, 5.0)
    k, v = make_kv()[0]
    with pytest.raises(ValueError, match="k: shape"):
        t.send_layer(0, k[:10], v)
    with pytest.raises(ValueError, match="v: dtype"):
        t.send_layer(0, k, v.astype(np.float64))
    with pytest.raises(ValueError, match="layer"):
        t.send_layer(9, k, v)
    t.send_layer(0, k, v)
    with pytest.raises(ValueError, match="layer: 0 sent twice"):
        t.send_layer(0, k, v)
    t.abort()


class SlowSink(ArraySink):
    """Writes slowly and records how many chunks the sender had released to the transport."""

    def __init__(self, pulled: list[int]):
        super().__init__(LAYOUT, 64, slots=1)
        self.pulled, self.writes, self.ahead = pulled, 0, []

    def write(self, request_id, layer, token_start, k, v):
        self.writes += 1
        self.ahead.append(self.pulled[0] - (self.writes - 1))  # chunks handed over but not yet written
        time.sleep(0.002)
        super().write(request_id, layer, token_start, k, v)


@pytest.mark.parametrize("window", [1, 2, 4])
def test_window_bounds_chunks_in_flight(harness, window):
    pulled = [0]

    def count(frames):
        for frame in frames:
            header, _ = wire.decode(frame)
            if header.WhichOneof("kind") == "chunk":
                pulled[0] += 1
            yield frame

    sink = SlowSink(pulled)
    h = harness(sink=sink, config=SenderConfig(chunk_bytes=1000, window=window), wrap=count)
    result = send_all(h)
    assert result.ok, result
    assert sink.writes == result.chunks >= 40
    assert max(sink.ahead) <= window and result.max_in_flight <= window
    assert max(sink.ahead) >= max(1, window - 1)  # the window was actually used (scheduling may lag one)


def test_concurrent_transfers_share_one_receiver(harness):
    h = harness(sink=ArraySink(LAYOUT, 64, slots=4))
    results = {}

    def run(rid, seed):
        results[rid] = send_all(h, rid, make_kv(seed=seed))

    threads = [threading.Thread(target=run, args=(f"r{i}", i)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert all(r.ok for r in results.values()) and len(results) == 4
    for i in range(4):
        assert np.array_equal(h.sink.read(f"r{i}")[1][3], make_kv(seed=i)[3][1])


def test_receiver_rejects_garbage_first_frame(harness):
    h = harness(wrap=lambda frames: iter([wire.encode(pb.KVFrameHeader(commit=pb.KVCommit(seq=1)))]))
    t = h.backend.open(h.target, "r1", LAYOUT, N_TOKENS, 5.0)
    assert wait_for(lambda: t.state is TransferState.FAILED)
    assert t.result().error_code == "INVALID_ARGUMENT" and "open" in t.result().error


class RefusingSink(ArraySink):
    """Refuses (like the paged pool) or crashes on the second write."""

    def __init__(self, error: Exception):
        super().__init__(LAYOUT, 64, slots=2)
        self.error, self.writes = error, 0

    def write(self, request_id, layer, token_start, k, v):
        self.writes += 1
        if self.writes == 2:
            raise self.error
        super().write(request_id, layer, token_start, k, v)


@pytest.mark.parametrize("error,code", [
    (KVRefused("OUT_OF_RANGE", "tokens [0, 10) outside the reservation"), "OUT_OF_RANGE"),
    (RuntimeError("pool bug"), "INTERNAL"),
])
def test_sink_write_failure_surfaces_and_releases(harness, error, code):
    sink = RefusingSink(error)
    h = harness(sink=sink)
    result = send_all(h)
    assert result.state is TransferState.FAILED and result.error_code == code
    # the receiver releases as its handler unwinds, which over gRPC can come after the sender's answer
    assert wait_for(lambda: ("abort", "r1") in sink.events and sink.free_slots == 2)
    sink.writes = 10
    assert send_all(h, "r2").ok  # the receiver keeps serving


def test_receiver_going_away_fails_sender_and_releases():
    from kvtransfer.grpc_backend import GrpcTransferBackend, start_kv_server

    sink = ArraySink(LAYOUT, 64)
    server, port = start_kv_server(sink)
    backend = GrpcTransferBackend()
    try:
        kv = make_kv()
        t = backend.open(f"127.0.0.1:{port}", "r1", LAYOUT, N_TOKENS, 5.0)
        t.send_layer(0, *kv[0])
        assert wait_for(lambda: t.state is TransferState.TRANSFERRING)
        server.stop(0)
        assert wait_for(lambda: t.state is TransferState.FAILED)
        assert t.result().error_code in ("UNAVAILABLE", "CANCELLED")
        assert wait_for(lambda: ("abort", "r1") in sink.events and sink.free_slots == 1)
    finally:
        backend.close()
        server.stop(0)
