"""The prefill worker's own lifecycle.

A prefill batch that fails after opening its KV transfers aborts them at once: the decode pool gets
its blocks back long before the transfers' deadline (found by tests/orchestrator/serving/test_fuzz.py,
where a negative seed made sampling raise and held the KV until the deadline). close() ends the batch loop.
"""
from __future__ import annotations

import asyncio

import pytest
from threadpoolctl import threadpool_limits

from decode.pool import PagedKVPool
from kvtransfer.inprocess import InProcessBackend
from kvtransfer.layout import KVLayout
from kvtransfer.receiver import KVReceiver
from model.loaded import load_model
from model.sampling import SamplingParams
from prefill.worker import PrefillJob, PrefillWorker
from tests.kvtransfer.conftest import wait_for

DEADLINE_S = 600.0  # the transfers' deadline: far beyond the wait below, so only an abort frees the KV


@pytest.fixture(scope="module")
def lm():
    with threadpool_limits(limits=1):  # see tests/decode/conftest.py
        yield load_model()


def test_a_batch_that_raises_releases_the_kv_of_its_transfers_at_once(lm):
    c = lm.weights.config
    layout = KVLayout(c.n_layers, c.n_kv_heads, c.head_dim, "float32")
    pool = PagedKVPool(layout, 16, capacity_tokens=512)
    receiver = KVReceiver(pool, layout)
    prefill = PrefillWorker("prefill-0", blas_threads=1, transfer_backend=InProcessBackend(receiver), loaded=lm)
    bad = SamplingParams(max_tokens=4, seed=-1)  # not validated here: sampling raises after every layer was sent
    job = PrefillJob("r1", lm.tokenizer.encode("Hello there"), bad, "decode-0", deadline_s=DEADLINE_S)

    result = asyncio.run(prefill.prefill(job))
    assert not result.ok and result.error.code == "INTERNAL"
    assert wait_for(lambda: receiver.stats.active == 0, timeout=30)
    assert pool.allocator.free_blocks == pool.allocator.n_blocks and pool.state("r1") is None
    assert receiver.stats.released == 1 and receiver.stats.committed == 0


def test_close_stops_the_batch_loop(lm):
    """close() ends the worker's batch loop task (an in-process worker's owner stops it, nothing left pending)."""
    c = lm.weights.config
    layout = KVLayout(c.n_layers, c.n_kv_heads, c.head_dim, "float32")
    receiver = KVReceiver(PagedKVPool(layout, 16, capacity_tokens=512), layout)
    prefill = PrefillWorker("prefill-0", blas_threads=1, transfer_backend=InProcessBackend(receiver), loaded=lm)
    job = PrefillJob("r1", lm.tokenizer.encode("Hello there"), SamplingParams(max_tokens=4), "decode-0",
                     deadline_s=DEADLINE_S)

    async def main():
        result = await prefill.prefill(job)
        loop_task = prefill._loop_task
        assert not loop_task.done()  # it waits for the next batch
        await prefill.close()
        return result, loop_task

    result, loop_task = asyncio.run(main())
    assert result.ok and loop_task.cancelled()
