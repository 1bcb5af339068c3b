"""DecodeWorker wrapped as a Ray async actor, as the pools build it (integration: starts local Ray)."""
from __future__ import annotations

import os

import pytest

from decode.worker import DecodeWorker
from model.finish import FinishReason
from model.sampling import SamplingParams

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_local():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep Ray on loopback
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, resources={"cs3": 1}, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_decode_worker_as_a_ray_actor_streams_exact_tokens(ray_local, book):
    ray = ray_local
    worker = ray.remote(DecodeWorker).options(resources={"cs3": 1}, num_cpus=0).remote(
        capacity_tokens=2048, blas_threads=1)
    refs = [book.get(i) for i in (6, 13)]
    for i, ref in enumerate(refs):
        ray.get(worker.accept_kv.remote(f"r{i}", ref.ks, ref.vs, ref.tokens[0], SamplingParams(max_tokens=8),
                                        ref.prompt))
    for i, ref in enumerate(refs):
        ids = []
        while True:
            chunk = ray.get(worker.next_tokens.remote(f"r{i}", 60))
            ids += chunk.token_ids
            if chunk.finished:
                break
        assert ids == ref.tokens[:8] and chunk.finish_reason is FinishReason.LENGTH
    load = ray.get(worker.load.remote())
    assert load.active == 0 and load.free_blocks == load.total_blocks
    ray.kill(worker)
