"""Injected KV faults (kvtransfer/faults.py) on both transports: each fails its transfer with its own
code, releases both sides at once, counts as fired only when applied, and leaves the next transfer whole."""
from __future__ import annotations

import numpy as np
import pytest

from kvtransfer.faults import KVFaults
from kvtransfer.sender import SenderConfig
from kvtransfer.states import TransferState
from tests.kvtransfer.conftest import make_kv, wait_for
from tests.kvtransfer.test_transfer import send_all


@pytest.mark.parametrize("kind, code, says", [
    ("corrupt", "DATA_LOSS", "checksum"),
    ("stall", "DEADLINE_EXCEEDED", "stalled: no frame sent or acknowledged"),
    ("truncate", None, ""),
])
def test_an_injected_fault_fails_its_transfer_and_releases_both_sides(harness, kind, code, says):
    h = harness(config=SenderConfig(chunk_bytes=4096, window=4, stall_timeout_s=0.3))
    h.backend.faults.arm(kind)
    result = send_all(h, "r1", deadline_s=30.0)  # a stall is caught by its timeout, long before the deadline
    assert result.state is TransferState.FAILED
    if code:
        assert result.error_code == code and says in result.error
    else:  # the stream ended short: the receiver refuses it, or the sender sees it end
        assert result.error_code in ("DATA_LOSS", "UNAVAILABLE", "CANCELLED"), result
    assert h.backend.faults.fired == {kind: 1} and h.backend.faults.armed == 0
    assert [hit[:2] for hit in h.backend.faults.hits] == [(kind, "r1")]
    assert wait_for(lambda: ("abort", "r1") in h.sink.events and h.sink.free_slots == 2)
    assert wait_for(lambda: h.receiver.stats.active == 0)

    kv = make_kv(seed=3)  # the next transfer carries no fault and arrives whole
    assert send_all(h, "r2", kv=kv).state is TransferState.COMMITTED
    k, v = h.sink.read("r2")  # (n_layers, n_tokens, n_kv_heads, head_dim)
    np.testing.assert_array_equal(k, np.stack([kl for kl, _ in kv]))
    np.testing.assert_array_equal(v, np.stack([vl for _, vl in kv]))


def test_faults_are_taken_in_order_and_counted_only_when_fired():
    faults = KVFaults()
    faults.arm("stall", 2)
    faults.arm("corrupt")
    assert [faults.take(), faults.take(), faults.take(), faults.take()] == ["stall", "stall", "corrupt", None]
    assert faults.fired == {}  # taken by transfers that never sent a chunk: not fired
    faults.fire("corrupt", "r7")
    assert faults.fired == {"corrupt": 1} and [h[:2] for h in faults.hits] == [("corrupt", "r7")]


@pytest.mark.parametrize("kind, count, says", [("melt", 1, "kind: 'melt' is not one of"), ("stall", 0, "count")])
def test_arming_names_what_is_wrong(kind, count, says):
    with pytest.raises(ValueError, match=says):
        KVFaults().arm(kind, count)
