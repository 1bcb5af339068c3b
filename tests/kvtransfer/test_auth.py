"""The KV receiver's transfer token and TLS, on real gRPC servers on 127.0.0.1 writing into a real
PagedKVPool: only a sender presenting the token writes; any other call is UNAUTHENTICATED and leaves
the pool as it was; neither the expected nor a presented token appears in a log line or an error."""
from __future__ import annotations

import secrets

import grpc
import pytest
import structlog

from decode.pool import PagedKVPool
from kvtransfer import wire
from kvtransfer.grpc_backend import GrpcTransferBackend, start_kv_server
from kvtransfer.layout import KVLayout
from kvtransfer.receiver import KVReceiver
from kvtransfer.states import TransferState
from protos.disagg.v1 import kvtransfer_pb2 as pb
from tests.kvtransfer.conftest import make_kv
from tests.tls import self_signed_certificate

LAYOUT = KVLayout(n_layers=2, n_kv_heads=2, head_dim=8)
N_TOKENS = 20
TOKEN = secrets.token_urlsafe(32)
WRONG = secrets.token_urlsafe(32)


class Receiver:
    """A PagedKVPool behind a KV server on 127.0.0.1 that demands TOKEN."""

    def __init__(self, credentials: grpc.ServerCredentials | None = None):
        self.pool = PagedKVPool(LAYOUT, 16, capacity_tokens=256)
        self.receiver = KVReceiver(self.pool, LAYOUT)
        self.server, port = start_kv_server(self.receiver, token=TOKEN, credentials=credentials)
        self.target = f"127.0.0.1:{port}"

    def snapshot(self) -> tuple[int, bytes, bytes, tuple]:
        """Free blocks, the pool's bytes and the receiver's counters: what an accepted transfer changes."""
        s = self.receiver.stats
        return (self.pool.allocator.free_blocks, self.pool.k.tobytes(), self.pool.v.tobytes(),
                (s.active, s.committed, s.released, s.bytes))


@pytest.fixture(scope="module")
def kv():
    r = Receiver()
    yield r
    r.server.stop(0)


def raw_frames(request_id: str) -> list[bytes]:
    """A whole valid transfer as a sender would frame it: open, one chunk per layer, commit."""
    frames = [wire.encode(pb.KVFrameHeader(open=pb.KVOpen(
        request_id=request_id, layout=wire.layout_to_msg(LAYOUT), n_tokens=N_TOKENS,
        checksum=pb.CHECKSUM_XXH3_64, window=8, timeout_ms=5000)))]
    for layer, (k, v) in enumerate(make_kv(N_TOKENS, LAYOUT)):
        frames.append(wire.encode(pb.KVFrameHeader(chunk=pb.KVChunkHeader(
            seq=layer + 1, layer=layer, token_start=0, n_tokens=N_TOKENS,
            checksum=wire.checksum(pb.CHECKSUM_XXH3_64, k, v), payload_bytes=k.nbytes + v.nbytes)), k, v))
    frames.append(wire.encode(pb.KVFrameHeader(commit=pb.KVCommit(seq=LAYOUT.n_layers + 1,
                                                                    n_chunks=LAYOUT.n_layers))))
    return frames


def raw_call(target: str, request_id: str, metadata) -> tuple[grpc.StatusCode, str, list[int]]:
    """Send a whole transfer with a bare gRPC client: (status, details, reply kinds)."""
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(wire.FULL_METHOD)(iter(raw_frames(request_id)), metadata=metadata, timeout=10)
        kinds = []
        try:
            kinds = [pb.KVReply.FromString(r).kind for r in call]
        except grpc.RpcError as e:
            return e.code(), e.details() or "", kinds
        return grpc.StatusCode.OK, "", kinds


BAD_METADATA = {
    "none": None,
    "wrong token": (("authorization", f"Bearer {WRONG}"),),
    "token with a suffix": (("authorization", f"Bearer {TOKEN}x"),),
    "token without Bearer": (("authorization", TOKEN),),
    "token under another key": (("x-kv-token", f"Bearer {TOKEN}"),),
    "empty": (("authorization", ""),),
}


@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_a_call_without_the_token_is_unauthenticated_and_writes_nothing(kv, case):
    before = kv.snapshot()
    with structlog.testing.capture_logs() as logs:
        code, details, kinds = raw_call(kv.target, f"r-{case}", BAD_METADATA[case])
    assert code is grpc.StatusCode.UNAUTHENTICATED and kinds == []
    assert "authorization" in details
    assert kv.snapshot() == before
    assert any(e["event"] == "kv transfer refused" for e in logs)
    assert TOKEN not in details + repr(logs) and WRONG not in details + repr(logs)


def test_the_same_frames_with_the_token_commit(kv):
    """The refused calls above send a valid transfer: with the token it lands in the pool."""
    free = kv.pool.allocator.free_blocks
    code, _, kinds = raw_call(kv.target, "r-ok", (("authorization", f"Bearer {TOKEN}"),))
    assert code is grpc.StatusCode.OK and kinds[-1] == pb.KV_REPLY_COMMITTED
    assert kv.pool.allocator.free_blocks < free
    kv.pool.abort("r-ok")
    assert kv.pool.allocator.free_blocks == free


def send(backend: GrpcTransferBackend, target: str, request_id: str):
    t = backend.open(target, request_id, LAYOUT, N_TOKENS, 5.0)
    for layer, (k, v) in enumerate(make_kv(N_TOKENS, LAYOUT)):
        t.send_layer(layer, k, v)
    return t.commit()


def test_the_sender_presents_its_token_and_a_wrong_one_fails_unauthenticated(kv, capfd):
    before = kv.snapshot()
    wrong, right = GrpcTransferBackend(token=WRONG), GrpcTransferBackend(token=TOKEN)
    try:
        with structlog.testing.capture_logs() as logs:
            refused = send(wrong, kv.target, "r-wrong")
        assert refused.state is TransferState.FAILED and refused.error_code == "UNAUTHENTICATED"
        assert kv.snapshot() == before
        ok = send(right, kv.target, "r-right")
        assert ok.ok, ok
    finally:
        wrong.close()
        right.close()
    kv.pool.abort("r-right")
    everything = repr(refused) + repr(logs) + "".join(capfd.readouterr())
    assert "UNAUTHENTICATED" in everything
    assert TOKEN not in everything and WRONG not in everything


def test_an_empty_token_is_refused():
    with pytest.raises(ValueError, match="token"):
        start_kv_server(PagedKVPool(LAYOUT, 16, capacity_tokens=64), token="")


def test_tls_with_the_token_commits_and_plaintext_fails_without_writing(tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    r = Receiver(grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    tls = GrpcTransferBackend(token=TOKEN, credentials=grpc.ssl_channel_credentials(cert.read_bytes()))
    plain = GrpcTransferBackend(token=TOKEN)
    try:
        before = r.snapshot()
        refused = send(plain, r.target, "r-plain")
        assert refused.state is TransferState.FAILED and refused.error_code == "UNAVAILABLE"
        assert r.snapshot() == before
        ok = send(tls, r.target, "r-tls")
        assert ok.ok, ok
        assert r.pool.state("r-tls") is TransferState.COMMITTED
    finally:
        tls.close()
        plain.close()
        r.server.stop(0)
