"""The authenticated KV path of a real deployment on a local Ray: the token the deployment generates at
start reaches its workers (requests complete, so the prefill actor presents it to the decode actor's
receiver), and a sender without it cannot write into a decode worker's KV pool."""
from __future__ import annotations

import os

import numpy as np
import pytest

from kvtransfer.grpc_backend import GrpcTransferBackend
from kvtransfer.layout import KVLayout
from kvtransfer.states import TransferState
from model.loaded import load_model
from orchestrator import client as cl
from orchestrator.serving.auth import KV_TOKEN_ENV
from tests.integration.stack import cluster_tree, config_of, running

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    saved = os.environ.pop(KV_TOKEN_ENV, None)  # the deployment generates its own token
    tree = cluster_tree()
    tree["metadata"]["pools"]["decode"]["kv_capacity_tokens"] = 4096
    tree["metadata"]["router"]["local_prefill_max_tokens"] = 0  # every prompt crosses the KV path
    try:
        with running(config_of(tree, tmp_path_factory.mktemp("cfg"))) as run:
            yield run.dep
    finally:
        if saved is not None:
            os.environ[KV_TOKEN_ENV] = saved


@pytest.fixture(scope="module")
def client(deployment):
    with cl.Client(deployment.target, timeout=120) as c:
        yield c


def _free_blocks(client) -> list[int]:
    return [w.kv_blocks_free for p in client.server_info().pools if p.name == "decode" for w in p.workers]


def test_requests_cross_the_authenticated_kv_path(client):
    res = client.complete(messages=[("user", "Name a river.")], max_tokens=4, sla_class="batch")
    assert res.token_ids and (res.final.prefill_worker, res.final.decode_worker) == ("prefill-0", "decode-0")


def test_a_sender_without_the_deployment_token_writes_nothing(deployment, client):
    c = load_model().weights.config
    layout = KVLayout(c.n_layers, c.n_kv_heads, c.head_dim, "float32")
    free = _free_blocks(client)
    backend = GrpcTransferBackend(token="not-the-deployment-token-0123456789")
    try:
        t = backend.open(deployment.pools.kv_targets["decode-0"], "intruder", layout, 16, 10.0)
        kv = np.ones((16, layout.n_kv_heads, layout.head_dim), np.float32)
        for layer in range(layout.n_layers):
            t.send_layer(layer, kv, kv)
        result = t.commit()
    finally:
        backend.close()
    assert result.state is TransferState.FAILED and result.error_code == "UNAUTHENTICATED", result
    assert _free_blocks(client) == free
