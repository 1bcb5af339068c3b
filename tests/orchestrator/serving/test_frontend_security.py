"""The frontend's bearer-token check and TLS, on a real grpc.aio server on loopback serving a small
stand-in for the inference service: protected calls need the key, health stays open, TLS clients
need the server's certificate."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from orchestrator import client as cl
from orchestrator.serving.auth import BearerAuth
from orchestrator.serving.frontend import ListenError, listen
from protos.disagg.v1 import inference_pb2 as pb
from tests.tls import self_signed_certificate

SERVICE = "disagg.v1.Inference"
KEY = "k3y-for-tests"


def _handler() -> grpc.GenericRpcHandler:
    async def model_info(request, context):
        return pb.ModelInfo(name="tiny", max_tokens_limit=8)

    async def generate(raw, context):
        yield pb.GenerateResponse(request_id="r", chunk=pb.TokenChunk(token_ids=[1], text="a"))
        yield pb.GenerateResponse(request_id="r", final=pb.Final(finish_reason=pb.FINISH_REASON_LENGTH))

    return grpc.method_handlers_generic_handler(SERVICE, {
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            model_info, request_deserializer=pb.GetModelInfoRequest.FromString,
            response_serializer=pb.ModelInfo.SerializeToString),
        "Generate": grpc.unary_stream_rpc_method_handler(
            generate, request_deserializer=None, response_serializer=pb.GenerateResponse.SerializeToString),
    })


def _run(check, auth: bool = True, tls=None) -> list:
    """Serve the stand-in (behind BearerAuth if `auth`) on 127.0.0.1, run check(target) in a thread."""
    refused: list[str] = []

    async def main():
        server = grpc.aio.server(interceptors=[BearerAuth(KEY, (SERVICE,), refused.append)] if auth else [])
        server.add_generic_rpc_handlers([_handler()])
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        port = listen(server, "127.0.0.1:0", tls)
        await server.start()
        try:
            await asyncio.get_running_loop().run_in_executor(None, check, f"127.0.0.1:{port}")
        finally:
            await server.stop(None)

    asyncio.run(main())
    return refused


def test_the_right_token_passes_on_unary_and_streaming_calls():
    def check(target):
        with cl.Client(target, token=KEY, timeout=5) as c:
            assert c.model_info().name == "tiny"
            assert c.complete(prompt="hi").text == "a"

    assert _run(check) == []


@pytest.mark.parametrize("token,reason", [(None, "missing"), ("wrong", "invalid bearer token"),
                                          (KEY + "x", "invalid bearer token")])
def test_a_missing_or_wrong_token_is_unauthenticated_on_every_call_kind(token, reason):
    def check(target):
        with cl.Client(target, token=token, timeout=5) as c:
            for call in (c.model_info, lambda: c.complete(prompt="hi")):
                with pytest.raises(cl.Unauthenticated, match=reason):
                    call()

    assert _run(check) == ["UNAUTHENTICATED"] * 2


def test_health_needs_no_token():
    def check(target):
        with cl.Client(target, timeout=5) as c:
            assert c.health() == "SERVING"

    assert _run(check) == []


def test_an_empty_key_is_refused():
    with pytest.raises(ValueError, match="api_key"):
        BearerAuth("", (SERVICE,))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


def test_tls_serves_clients_that_trust_the_certificate(certificate):
    cert, _ = certificate

    def check(target):
        with cl.Client(target, root_certificates=cert.read_bytes(), token=KEY, timeout=5) as c:
            assert c.model_info().name == "tiny" and c.complete(prompt="hi").text == "a"

    assert _run(check, tls=certificate) == []


def test_tls_refuses_plaintext_and_untrusting_clients(certificate):
    def check(target):
        for client in (cl.Client(target, timeout=5), cl.Client(target, tls=True, timeout=5)):
            with client as c, pytest.raises(cl.Unavailable):
                c.model_info()

    assert _run(check, auth=False, tls=certificate) == []


def test_a_key_that_does_not_match_the_certificate_names_both_files(certificate, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other = tmp_path / "other-key.pem"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    async def main():
        server = grpc.aio.server()
        try:
            with pytest.raises(ListenError, match="other-key.pem"):
                listen(server, "127.0.0.1:0", (certificate[0], other))
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_a_port_in_use_is_a_listen_error_naming_the_setting():
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]

    async def main():
        server = grpc.aio.server()
        try:
            with pytest.raises(ListenError, match=f"frontend.port: cannot listen on 127.0.0.1:{port}"):
                listen(server, f"127.0.0.1:{port}", None)
        finally:
            await server.stop(None)

    try:
        asyncio.run(main())
    finally:
        holder.close()
