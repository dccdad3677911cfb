"""The HTTP API serves HTTPS (and mutual TLS) with the gRPC port's TLS settings."""

import ssl
from pathlib import Path

import grpc
import httpx
import pytest

from devstack.redis_server import RedisServer
from tests.integration.stack import MODEL, Stack
from tests.security.certs import make_certificates


def https_gateway(
    redis_server: RedisServer, folder: Path, mutual: bool
) -> tuple[Stack, ssl.SSLContext, ssl.SSLContext]:
    """The gateway, a client context as it should connect, and one that trusts the CA only."""
    ca, server, client = make_certificates(folder)
    env = {"GATEWAY_TLS_CERT_FILE": str(server.cert), "GATEWAY_TLS_KEY_FILE": str(server.key)}
    if mutual:
        env["GATEWAY_TLS_CLIENT_CA_FILE"] = str(ca.cert)
    context = ssl.create_default_context(cafile=str(ca.cert))
    trust_only = ssl.create_default_context(cafile=str(ca.cert))
    credentials = grpc.ssl_channel_credentials(
        ca.cert.read_bytes(), client.key.read_bytes(), client.cert.read_bytes()
    )
    stack = Stack(redis_server, folder, gateway_env=env, credentials=credentials)
    stack.start_gateway()
    if mutual:
        context.load_cert_chain(str(client.cert), str(client.key))
    return stack, context, trust_only


def models(stack: Stack, verify: ssl.SSLContext) -> list[str]:
    reply = httpx.get(f"{stack.http_url}/openai/v1/models", verify=verify, timeout=5)
    return [m["id"] for m in reply.json()["data"]]


@pytest.mark.parametrize("mutual", [False, True])
def test_https_with_the_grpc_tls_settings(secure_redis: RedisServer, tmp_path: Path, mutual: bool) -> None:
    stack, context, trust_only = https_gateway(secure_redis, tmp_path, mutual)
    try:
        assert stack.http_url.startswith("https://") and models(stack, context) == [MODEL]
        with pytest.raises(httpx.HTTPError):  # plaintext HTTP on the TLS port
            httpx.get(f"http://127.0.0.1:{stack.http_port}/openai/v1/models", timeout=5)
        if mutual:
            with pytest.raises(httpx.HTTPError):  # no client certificate
                models(stack, trust_only)
    finally:
        stack.stop()
