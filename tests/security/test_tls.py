"""TLS and mutual TLS on the gateway's port, with certificates the test generates."""

from pathlib import Path

import grpc
import pytest

from chat.v1 import chat_pb2, chat_pb2_grpc
from chat_client import TLS, APIConnectionError, Client
from devstack.redis_server import RedisServer
from tests.integration.stack import MODEL, Stack
from tests.security.certs import make_certificates


def tls_gateway(redis_server: RedisServer, folder: Path, mutual: bool) -> tuple[Stack, TLS]:
    ca, server, client = make_certificates(folder)
    env = {"GATEWAY_TLS_CERT_FILE": str(server.cert), "GATEWAY_TLS_KEY_FILE": str(server.key)}
    if mutual:
        env["GATEWAY_TLS_CLIENT_CA_FILE"] = str(ca.cert)
    client_tls = TLS(ca.cert.read_bytes(), client.cert.read_bytes(), client.key.read_bytes())
    stack = Stack(redis_server, folder, gateway_env=env, credentials=client_tls.credentials())
    stack.start_gateway()
    return stack, TLS(ca.cert.read_bytes()) if not mutual else client_tls


def test_tls_serves_trusting_clients_and_refuses_plaintext(secure_redis: RedisServer, tmp_path: Path) -> None:
    stack, tls = tls_gateway(secure_redis, tmp_path, mutual=False)
    try:
        with Client(stack.address, tls=tls) as client:
            assert [m.id for m in client.models.list()] == [MODEL]
        with grpc.insecure_channel(stack.address) as plain, pytest.raises(grpc.RpcError) as caught:
            chat_pb2_grpc.ChatServiceStub(plain).ListModels(chat_pb2.ListModelsRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stack.stop()


def test_mutual_tls_refuses_a_client_without_a_certificate(secure_redis: RedisServer, tmp_path: Path) -> None:
    stack, tls = tls_gateway(secure_redis, tmp_path, mutual=True)
    try:
        with Client(stack.address, tls=tls) as client:
            assert [m.id for m in client.models.list()] == [MODEL]
        no_certificate = TLS(tls.root_certificates)
        with (
            Client(stack.address, tls=no_certificate, timeout=5) as client,
            pytest.raises(APIConnectionError),
        ):
            client.models.list()
    finally:
        stack.stop()
