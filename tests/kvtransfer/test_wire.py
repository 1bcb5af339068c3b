"""Frame encoding, zero-copy payload views and checksums."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import xxhash

from kvtransfer import wire
from kvtransfer.layout import KVLayout
from protos.disagg.v1 import kvtransfer_pb2 as pb


def test_frame_round_trip_zero_copy_views():
    layout = KVLayout(2, 3, 4)
    k = np.arange(5 * 3 * 4, dtype=np.float32).reshape(5, 3, 4)
    v = -k
    header = pb.KVFrameHeader(chunk=pb.KVChunkHeader(seq=7, layer=1, token_start=10, n_tokens=5))
    frame = wire.encode(header, k, v)
    parsed, offset = wire.decode(frame)
    assert parsed.chunk.seq == 7 and parsed.WhichOneof("kind") == "chunk"
    k2, v2 = wire.payload_arrays(frame, offset, layout, 5)
    assert np.array_equal(k2, k) and np.array_equal(v2, v)
    assert not k2.flags.writeable and k2.base is not None  # a view of the received bytes, not a copy


@pytest.mark.parametrize("scheme,ref", [(pb.CHECKSUM_CRC32, zlib.crc32), (pb.CHECKSUM_ADLER32, zlib.adler32)])
def test_checksum_chains_over_buffers_and_blocks(scheme, ref):
    rng = np.random.default_rng(1)
    a = rng.standard_normal(300_001).astype(np.float32)  # > one 256 KB block, odd length
    b = bytes(range(256)) * 3000
    assert wire.checksum(scheme, a, b) == ref(a.tobytes() + b)
    assert wire.checksum(scheme, memoryview(a.tobytes() + b)) == ref(a.tobytes() + b)
    assert wire.checksum(pb.CHECKSUM_NONE, a) == 0
    with pytest.raises(ValueError, match="checksum"):
        wire.checksum(99, a)


def test_xxh3_checksum_chains_over_buffers_and_uses_64_bits():
    rng = np.random.default_rng(2)
    k = rng.standard_normal((7, 3, 16)).astype(np.float32)
    v = rng.standard_normal((7, 3, 16)).astype(np.float32)
    joined = k.tobytes() + v.tobytes()
    value = wire.checksum(pb.CHECKSUM_XXH3_64, k, v)
    assert value == xxhash.xxh3_64_intdigest(joined) == wire.checksum(pb.CHECKSUM_XXH3_64, memoryview(joined))
    assert wire.CHECKSUMS[wire.DEFAULT_CHECKSUM] == pb.CHECKSUM_XXH3_64
    # the header field is uint64: a checksum above 2**32 survives the frame round trip
    big = next(wire.checksum(pb.CHECKSUM_XXH3_64, k[:i]) for i in range(1, 8)
               if wire.checksum(pb.CHECKSUM_XXH3_64, k[:i]) >= 2**32)
    frame = wire.encode(pb.KVFrameHeader(chunk=pb.KVChunkHeader(seq=1, checksum=big)), k)
    assert wire.decode(frame)[0].chunk.checksum == big
    corrupted = bytearray(joined)
    corrupted[len(joined) // 2] ^= 0x01  # one flipped bit changes the checksum
    assert wire.checksum(pb.CHECKSUM_XXH3_64, bytes(corrupted)) != value


def test_decode_rejects_truncated_frames():
    with pytest.raises(ValueError, match="frame"):
        wire.decode(b"\x01")
    with pytest.raises(ValueError, match="header length"):
        wire.decode(b"\xff\x00\x00\x00abc")


def test_layout_message_round_trip():
    layout = KVLayout(30, 3, 64, "float32")
    assert wire.layout_from_msg(wire.layout_to_msg(layout)) == layout
