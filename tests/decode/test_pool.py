"""Block allocator and paged KV pool (the KVSink): accounting, refusals, leaks. No model needed."""
from __future__ import annotations

import numpy as np
import pytest

from decode.allocator import BlockAllocator
from decode.pool import PagedKVPool
from decode.scheduler import DecodeSeq, Scheduler
from kvtransfer.states import TransferState
from kvtransfer.layout import KVLayout
from kvtransfer.sink import KVRefused

LAYOUT = KVLayout(n_layers=3, n_kv_heads=2, head_dim=4)


def kv(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 2, 4), dtype=np.float32), rng.standard_normal((n, 2, 4), dtype=np.float32))


def test_allocator_allocate_extend_release():
    a = BlockAllocator(n_blocks=8, block_size=4)
    assert a.capacity_tokens == 32 and a.blocks_for(0) == 0 and a.blocks_for(5) == 2
    assert a.allocate("x", 5) == [0, 1]
    assert a.extend("x", 8) and len(a.block_table("x")) == 2
    assert a.extend("x", 9) and len(a.block_table("x")) == 3
    assert a.free_blocks == 5 and a.used_blocks == 3
    assert not a.extend("x", 33) and len(a.block_table("x")) == 3  # unchanged on failure
    assert not a.can_allocate(21) and a.can_allocate(20)
    with pytest.raises(MemoryError):
        a.allocate("y", 21)
    assert not a.holds("y") and a.free_blocks == 5  # nothing held on refusal
    assert a.release("x") == 3 and a.release("x") == 0  # idempotent
    a.check()
    assert a.free_blocks == 8


def test_allocator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_blocks"):
        BlockAllocator(0, 4)
    a = BlockAllocator(4, 4)
    a.allocate("x", 1)
    with pytest.raises(ValueError, match="seq_id"):
        a.allocate("x", 1)


def test_pool_capacity_in_bytes_and_tokens():
    by_tokens = PagedKVPool(LAYOUT, 4, capacity_tokens=40)
    assert by_tokens.allocator.n_blocks == 10
    per_block = LAYOUT.bytes_for(4)
    by_bytes = PagedKVPool(LAYOUT, 4, capacity_bytes=10 * per_block + per_block // 2)
    assert by_bytes.allocator.n_blocks == 10 and by_bytes.capacity_bytes == 10 * per_block
    by_bytes.open("r", LAYOUT, 9)  # 9 tokens + 1 of headroom: 3 blocks
    assert (by_bytes.used_bytes, by_bytes.free_bytes) == (3 * per_block, 7 * per_block)
    by_bytes.abort("r")
    assert by_bytes.free_bytes == by_bytes.capacity_bytes
    with pytest.raises(ValueError, match="capacity"):
        PagedKVPool(LAYOUT, 4, capacity_tokens=40, capacity_bytes=100)


def test_sink_roundtrip_writes_tokens_into_their_blocks():
    pool = PagedKVPool(LAYOUT, 4, capacity_tokens=64)
    pool.allocator.allocate("other", 3)  # so the sequence's blocks are not 0..n
    pool.open("r", LAYOUT, 10)
    assert pool.allocator.capacity_of("r") >= 11  # one token of headroom for the first step
    k, v = kv(10)
    for layer in range(3):
        pool.write("r", layer, 0, k[:6], v[:6])
        pool.write("r", layer, 6, k[6:], v[6:])
    pool.commit("r")
    assert pool.state("r") is TransferState.COMMITTED
    table = pool.allocator.block_table("r")
    for t in range(10):
        b, o = table[t // 4], t % 4
        np.testing.assert_array_equal(pool.k[2][:, b, o], k[t])
        np.testing.assert_array_equal(pool.v[0][:, b, o], v[t])


def test_store_accepts_non_contiguous_arrays():
    """The recompute path hands the pool views of the model's arrays, not received frames."""
    pool = PagedKVPool(LAYOUT, 4, capacity_tokens=64)
    pool.allocator.allocate("r", 9)
    k, v = kv(9)
    k_f, v_strided = np.asfortranarray(k), np.repeat(v, 2, axis=2)[:, :, ::2]
    assert not k_f.flags.c_contiguous and not v_strided.flags.c_contiguous
    pool.store("r", 1, 0, k_f, v_strided)
    table = pool.allocator.block_table("r")
    for t in range(9):
        np.testing.assert_array_equal(pool.k[1][:, table[t // 4], t % 4], k[t])
        np.testing.assert_array_equal(pool.v[1][:, table[t // 4], t % 4], v[t])


@pytest.mark.parametrize("field,bad", [("n_layers", 4), ("n_kv_heads", 3), ("head_dim", 8), ("dtype", "float16")])
def test_open_refuses_layout_mismatch_naming_the_field(field, bad):
    pool = PagedKVPool(LAYOUT, 4, capacity_tokens=64)
    pool.open("ok", LAYOUT, 5)
    wrong = KVLayout(**{**{f: getattr(LAYOUT, f) for f in ("n_layers", "n_kv_heads", "head_dim", "dtype")},
                        field: bad})
    with pytest.raises(KVRefused) as e:
        pool.open("bad", wrong, 5)
    assert e.value.code == "INVALID_ARGUMENT" and field in str(e.value)
    assert not pool.allocator.holds("bad") and pool.state("ok") is TransferState.TRANSFERRING


def test_open_refuses_when_blocks_do_not_fit_and_holds_nothing():
    pool = PagedKVPool(LAYOUT, 4, capacity_tokens=32)  # 8 blocks
    pool.open("a", LAYOUT, 20)  # 21 tokens -> 6 blocks
    free = pool.allocator.free_blocks
    with pytest.raises(KVRefused) as e:
        pool.open("b", LAYOUT, 8)  # 9 tokens -> 3 blocks, 2 free
    assert e.value.code == "RESOURCE_EXHAUSTED"
    assert pool.allocator.free_blocks == free and pool.state("b") is None


def test_write_and_commit_validate_shapes_and_token_counts():
    pool = PagedKVPool(LAYOUT, 4, capacity_tokens=64)
    pool.open("r", LAYOUT, 6)
    k, v = kv(6)
    with pytest.raises(KVRefused, match="shape"):
        pool.write("r", 0, 0, k[:, :1], v[:, :1])
    with pytest.raises(KVRefused, match="layer"):
        pool.write("r", 3, 0, k, v)
    with pytest.raises(KVRefused) as e:
        pool.write("r", 0, 2, k, v)
    assert e.value.code == "OUT_OF_RANGE"
    pool.write("r", 0, 0, k, v)
    with pytest.raises(KVRefused, match="token count: layer 1 got 0 of 6"):
        pool.commit("r")
    with pytest.raises(KVRefused) as e:
        pool.write("nope", 0, 0, k, v)
    assert e.value.code == "NOT_FOUND"


def test_abort_releases_everything_and_is_idempotent():
    pool = PagedKVPool(LAYOUT, 4, capacity_tokens=64)
    pool.open("r", LAYOUT, 9)
    pool.write("r", 0, 0, *kv(9))
    pool.abort("r")
    pool.abort("r")
    pool.abort("never-opened")
    assert pool.allocator.free_blocks == pool.allocator.n_blocks and pool.state("r") is None
    pool.allocator.check()


def test_commit_callback_and_abort_of_an_active_sequence_is_delegated():
    pool = PagedKVPool(LAYOUT, 4, capacity_tokens=64)
    committed, aborted = [], []
    pool.on_commit, pool.on_abort = committed.append, aborted.append
    k, v = kv(3)
    pool.load_sequence("r", [k] * 3, [v] * 3)
    assert committed == ["r"]
    assert pool.claim("r") == 3
    pool.abort("r")  # the scheduler owns it now: handed over, blocks still held
    assert aborted == ["r"] and pool.allocator.holds("r")


def test_in_process_load_refuses_ragged_token_counts_and_holds_nothing():
    pool = PagedKVPool(LAYOUT, 4, capacity_tokens=64)
    k, v = kv(6)
    with pytest.raises(KVRefused) as e:
        pool.load_sequence("r", [k, k, k[:5]], [v, v, v[:5]])
    assert e.value.code == "INVALID_ARGUMENT" and "token count: layer 2" in str(e.value)
    with pytest.raises(KVRefused):
        pool.load_sequence("r", [k, k], [v, v])  # 2 layers for a 3-layer pool
    assert pool.state("r") is None and pool.allocator.free_blocks == pool.allocator.n_blocks


@pytest.mark.parametrize("n_tokens", [3, 4, 7, 8])
def test_open_is_the_shared_handoff_admission(n_tokens):
    """The pool reserves what BlockAllocator.reserve does (prompt + the first step), refuses when
    that does not fit, and a committed sequence then runs its first step without another block."""
    pool = PagedKVPool(LAYOUT, 4, capacity_tokens=8)
    mirror = BlockAllocator(2, 4)
    if not mirror.reserve("r", n_tokens):
        with pytest.raises(KVRefused) as e:
            pool.open("r", LAYOUT, n_tokens)
        assert e.value.code == "RESOURCE_EXHAUSTED"
        assert pool.allocator.free_blocks == 2
        return
    pool.load_sequence("r", *(list(x) for x in zip(*[kv(n_tokens, s) for s in range(3)])))
    assert pool.allocator.block_table("r") == mirror.block_table("r")
    sched = Scheduler(pool.allocator, max_batch=1)
    assert sched.add(DecodeSeq("r", pool.claim("r"), [1], max_tokens=2)) is None
    plan = sched.schedule()
    assert [s.request_id for s in plan.batch] == ["r"] and plan.preempted == []
