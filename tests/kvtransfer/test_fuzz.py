"""Fuzzing the KV receiving side: arbitrary bytes to the frame decoder, and arbitrary frames and field
values to a real KV server on 127.0.0.1 writing into a PagedKVPool. Nothing crashes or hangs, every
bad stream ends with an error reply naming its status (never INTERNAL), and the pool is whole after."""
from __future__ import annotations

import grpc
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from decode.pool import PagedKVPool
from kvtransfer import wire
from kvtransfer.bearer import bearer_metadata
from kvtransfer.grpc_backend import start_kv_server
from kvtransfer.layout import KVLayout
from kvtransfer.receiver import KVReceiver
from protos.disagg.v1 import kvtransfer_pb2 as pb
from tests.kvtransfer.conftest import wait_for

LAYOUT = KVLayout(n_layers=2, n_kv_heads=2, head_dim=4)
TOKEN = "fuzzing-token-0123456789"
# what a receiver may answer a bad stream with; INTERNAL or UNKNOWN would be a bug of ours
REFUSALS = {"INVALID_ARGUMENT", "OUT_OF_RANGE", "DATA_LOSS", "RESOURCE_EXHAUSTED", "ALREADY_EXISTS",
            "DEADLINE_EXCEEDED", "FAILED_PRECONDITION", "NOT_FOUND", "CANCELLED"}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

i32 = st.integers(-2**31, 2**31 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@given(st.binary(max_size=300))
@settings(max_examples=400, deadline=None)
def test_the_frame_decoder_returns_a_header_or_raises_value_error(frame):
    try:
        header, offset = wire.decode(frame)
    except ValueError:
        return
    assert isinstance(header, pb.KVFrameHeader) and 4 <= offset <= len(frame)


@given(st.binary(max_size=200), st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_a_well_framed_garbage_header_raises_value_error_or_parses(header, payload):
    frame = len(header).to_bytes(4, "little") + header + payload
    try:
        parsed, offset = wire.decode(frame)
    except ValueError:
        return
    assert offset == 4 + len(header) and parsed.ByteSize() <= len(header)


class Server:
    """A token-protected KV server over a small PagedKVPool, with a raw client that speaks to it."""

    def __init__(self):
        self.pool = PagedKVPool(LAYOUT, 4, capacity_tokens=64, max_context=64)
        self.receiver = KVReceiver(self.pool)  # no expected layout: the receiver's own checks are fuzzed too
        self.server, port = start_kv_server(self.receiver, token=TOKEN)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.call = self.channel.stream_stream(wire.FULL_METHOD)

    def send(self, frames: list[bytes]) -> list[pb.KVReply]:
        """Every reply of one stream; the stream must end OK (refusals are replies) well before its deadline."""
        return [pb.KVReply.FromString(r) for r in self.call(iter(frames), metadata=bearer_metadata(TOKEN),
                                                               timeout=20)]

    def check_whole(self, replies: list[pb.KVReply], request_id: str) -> None:
        errors = [r for r in replies if r.kind == pb.KV_REPLY_ERROR]
        assert all(r.code in REFUSALS for r in errors), [(r.code, r.message) for r in errors]
        assert not errors or replies[-1] is errors[0]  # an error ends the stream
        if replies and replies[-1].kind == pb.KV_REPLY_COMMITTED:
            self.pool.abort(request_id)
        assert wait_for(lambda: self.receiver.stats.active == 0)
        assert self.pool.allocator.free_blocks == self.pool.allocator.n_blocks  # nothing leaked


@pytest.fixture(scope="module")
def kv():
    s = Server()
    yield s
    s.channel.close()
    s.server.stop(0)


framed = st.binary(max_size=100).map(lambda h: len(h).to_bytes(4, "little") + h)  # a length prefix that fits


@given(frames=st.lists(st.one_of(st.binary(max_size=120), framed), max_size=6))
@FUZZ
def test_raw_bytes_as_frames(kv, frames):
    kv.check_whole(kv.send(frames), "")


layouts = st.builds(pb.KVLayoutMsg, n_layers=st.one_of(st.just(LAYOUT.n_layers), i32),
                    n_kv_heads=st.one_of(st.just(LAYOUT.n_kv_heads), i32),
                    head_dim=st.one_of(st.just(LAYOUT.head_dim), i32),
                    dtype=st.one_of(st.just("float32"), st.text(max_size=8), st.sampled_from(
                        ["float16", "O", "S0", "V0", "f4,f4", "(2)f4", "(2,", "f4,(", "complex64", "int8", ""])))
opens = st.builds(pb.KVOpen, request_id=st.text(max_size=20), layout=layouts,
                  n_tokens=st.one_of(st.integers(1, 70), i32), checksum=st.integers(0, 5),
                  window=i32, timeout_ms=st.one_of(st.just(5000.0), st.floats(allow_nan=True)))
chunks = st.builds(pb.KVChunkHeader, seq=st.one_of(st.integers(0, 4), u32),
                   layer=st.one_of(st.integers(-1, 2), i32), token_start=st.one_of(st.integers(-1, 70), i32),
                   n_tokens=st.one_of(st.integers(-1, 70), i32), checksum=u64,
                   payload_bytes=st.one_of(st.integers(0, 4096), u64))
tails = st.one_of(
    st.builds(pb.KVCommit, seq=u32, n_chunks=u32, total_bytes=u64).map(lambda c: pb.KVFrameHeader(commit=c)),
    st.builds(pb.KVAbort, seq=u32, reason=st.text(max_size=10)).map(lambda a: pb.KVFrameHeader(abort=a)))


@st.composite
def chunk_frames(draw):
    """A chunk header with arbitrary fields and a payload of its declared size, or of any other."""
    h = draw(chunks)
    size = h.payload_bytes if h.payload_bytes <= 4096 and draw(st.booleans()) else draw(st.integers(0, 512))
    return wire.encode(pb.KVFrameHeader(chunk=h), np.random.default_rng(h.seq).bytes(size))


@given(open_=opens, body=st.lists(chunk_frames(), max_size=5), tail=st.one_of(st.none(), tails))
@FUZZ
def test_arbitrary_field_values_after_an_open(kv, open_, body, tail):
    frames = [wire.encode(pb.KVFrameHeader(open=open_)), *body]
    if tail is not None:
        frames.append(wire.encode(tail))
    kv.check_whole(kv.send(frames), open_.request_id)
