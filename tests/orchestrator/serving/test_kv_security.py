"""The deployment's KV credentials: where the transfer token comes from (environment, cluster.yaml,
generated), that no repr, log line or config error shows it, and TLS on the KV path from the same
certificate settings and helper as the frontend, on real gRPC on 127.0.0.1."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import structlog
import yaml

from decode.pool import PagedKVPool
from kvtransfer.grpc_backend import GrpcTransferBackend, start_kv_server
from kvtransfer.layout import KVLayout
from kvtransfer.states import TransferState
from orchestrator.core.config import ConfigError, parse_config
from orchestrator.serving.auth import KV_TOKEN_ENV, KVSecurity, kv_security
from tests.kvtransfer.conftest import make_kv
from tests.paths import REPO
from tests.tls import self_signed_certificate

FILE_TOKEN = "token-from-cluster-yaml-0123456789"
ENV_TOKEN = "token-from-the-environment-0123456789"
TREE = yaml.safe_load((REPO / "cluster.yaml").read_text())


def config(tmp_path: Path, **kv_transfer):
    tree = copy.deepcopy(TREE)
    tree["metadata"]["kv_transfer"] = kv_transfer
    tree["metadata"]["workload"]["trace"] = str(REPO / "cluster.yaml")  # any file: the trace is not read here
    return parse_config(tree, tmp_path / "cluster.yaml")


def test_the_environment_wins_then_cluster_yaml_then_a_generated_token(tmp_path, monkeypatch):
    monkeypatch.setenv(KV_TOKEN_ENV, ENV_TOKEN)
    assert kv_security(config(tmp_path, token=FILE_TOKEN)).token == ENV_TOKEN
    monkeypatch.delenv(KV_TOKEN_ENV)
    assert kv_security(config(tmp_path, token=FILE_TOKEN)).token == FILE_TOKEN
    first, second = kv_security(config(tmp_path)).token, kv_security(config(tmp_path)).token
    assert first != second and len(first) >= 32  # secrets.token_urlsafe(32): a fresh one per deployment


def test_the_token_is_in_no_repr_and_no_log_line(tmp_path, monkeypatch):
    monkeypatch.delenv(KV_TOKEN_ENV, raising=False)
    cfg = config(tmp_path, token=FILE_TOKEN)
    with structlog.testing.capture_logs() as logs:
        security = kv_security(cfg)
    assert logs and logs[0]["source"] == "metadata.kv_transfer.token"
    assert FILE_TOKEN not in repr(logs) + repr(security) + repr(cfg) + repr(cfg.kv_transfer)


@pytest.mark.parametrize("token", ["short", 12345678901234567890])
def test_a_bad_token_in_cluster_yaml_is_a_config_error_that_does_not_show_it(tmp_path, token):
    with pytest.raises(ConfigError, match="kv_transfer.token: must be a string of at least 16") as e:
        config(tmp_path, token=token)
    assert str(token) not in str(e.value)


def test_a_short_token_in_the_environment_is_refused_without_showing_it(tmp_path, monkeypatch):
    monkeypatch.setenv(KV_TOKEN_ENV, "tiny-token")
    with pytest.raises(ValueError, match=KV_TOKEN_ENV) as e:
        kv_security(config(tmp_path))
    assert "tiny-token" not in str(e.value)


def test_kv_tls_from_cluster_yaml_carries_a_transfer_and_senders_get_no_key(tmp_path, monkeypatch):
    monkeypatch.delenv(KV_TOKEN_ENV, raising=False)
    cert, key = self_signed_certificate(tmp_path)
    security = kv_security(config(tmp_path, token=FILE_TOKEN, tls_cert_file="cert.pem", tls_key_file="key.pem"))
    assert security.key_pem == key.read_bytes()
    senders = security.for_senders()
    assert senders.key_pem is None and senders.token == FILE_TOKEN and senders.cert_pem == cert.read_bytes()
    assert "PRIVATE KEY" not in repr(security)

    layout = KVLayout(2, 2, 8)
    pool = PagedKVPool(layout, 16, capacity_tokens=64)
    server, port = start_kv_server(pool, expected_layout=layout, token=security.token,
                                   credentials=security.server_credentials())
    backend = GrpcTransferBackend(token=senders.token, credentials=senders.channel_credentials())
    try:
        t = backend.open(f"127.0.0.1:{port}", "r1", layout, 10, 5.0)
        for layer, (k, v) in enumerate(make_kv(10, layout)):
            t.send_layer(layer, k, v)
        assert t.commit().ok and pool.state("r1") is TransferState.COMMITTED
    finally:
        backend.close()
        server.stop(0)


def test_no_tls_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv(KV_TOKEN_ENV, raising=False)
    security = kv_security(config(tmp_path))
    assert security.cert_pem is None and security.server_credentials() is None and security.channel_credentials() is None
    assert KVSecurity("t" * 16).for_senders() == KVSecurity("t" * 16)


def test_kv_tls_settings_are_checked_like_the_frontends(tmp_path):
    cert, _ = self_signed_certificate(tmp_path)
    with pytest.raises(ConfigError, match="metadata.kv_transfer.tls_key_file: required with tls_cert_file"):
        config(tmp_path, tls_cert_file=str(cert))
