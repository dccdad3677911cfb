"""TLS and mutual TLS on the gateway's port, with certificates the test generates."""

import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import redis

from chat.v1 import chat_pb2, chat_pb2_grpc
from chat_client import TLS, APIConnectionError, Client
from devstack.redis_server import RedisServer, free_port
from tests.integration.stack import MODEL, Stack, chat_request
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


def test_gateway_and_worker_use_redis_over_tls_with_a_password(tmp_path: Path) -> None:
    ca, server, _ = make_certificates(tmp_path)
    port = free_port()
    redis_tls = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--dir", str(tmp_path), "--tls-cert-file", str(server.cert), "--tls-key-file", str(server.key),
         "--tls-ca-cert-file", str(ca.cert), "--tls-auth-clients", "no", "--requirepass", "s3cret",
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"rediss://:s3cret@127.0.0.1:{port}/0"
    try:
        probe = redis.Redis.from_url(url, ssl_ca_certs=str(ca.cert))
        for _ in range(100):
            try:
                if probe.ping():
                    break
            except redis.ConnectionError:
                time.sleep(0.05)
        tls_env = {"REDIS_TLS_CA_FILE": str(ca.cert)}
        stack = Stack(
            SimpleNamespace(url=url),  # type: ignore[arg-type]
            tmp_path,
            gateway_env=tls_env,
            worker_env={**tls_env, "WORKER_ENGINE": "bench", "WORKER_BENCH_TOKENS_PER_SECOND": "0"},
        )
        stack.start_gateway()
        stack.start_worker()
        try:
            stack.wait_worker_ready(timeout=60)
            with grpc.insecure_channel(stack.address) as channel:
                reply = chat_pb2_grpc.ChatServiceStub(channel).ChatCompletion(
                    chat_request(max_tokens=3), timeout=20
                )
            assert reply.choices[0].message.content == "t1 t2 t3 "
        finally:
            stack.stop()
    finally:
        redis_tls.terminate()
        redis_tls.wait(timeout=10)
