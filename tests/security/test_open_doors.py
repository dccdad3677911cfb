"""With GATEWAY_AUTH=on no call answers without a key, and nothing costly runs before the key and
its request limit are checked (issue 22, section 4), against a real stack."""

import socket
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from chat.v1 import chat_pb2, chat_pb2_grpc
from devstack.redis_server import RedisServer
from tests.integration.stack import MODEL, Stack, chat_request
from tests.security.conftest import logs, new_key

ALIAS = "mixtral-8x7b-32768"  # maps onto MODEL in every test stack


def bearer(key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key else ()


def grpc_models(stack: Stack, key: str | None) -> list[str]:
    with grpc.insecure_channel(stack.address) as channel:
        reply = chat_pb2_grpc.ChatServiceStub(channel).ListModels(
            chat_pb2.ListModelsRequest(), metadata=bearer(key), timeout=10
        )
    return [m.id for m in reply.data]


def http_get(stack: Stack, path: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{stack.http_url}{path}", headers=headers, timeout=10)


def list_services(stack: Stack, key: str | None) -> set[str]:
    with grpc.insecure_channel(stack.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [reply] = stub.ServerReflectionInfo(iter([request]), metadata=bearer(key), timeout=10)
    return {s.name for s in reply.list_services_response.service}


def test_listing_models_needs_a_key(auth_stack: Stack) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        grpc_models(auth_stack, None)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as caught:
        grpc_models(auth_stack, "sk-chat-not-a-real-key")
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for path in ("/v1/models", "/openai/v1/models", f"/v1/models/{MODEL}", f"/openai/v1/models/{ALIAS}"):
        reply = http_get(auth_stack, path, None)
        assert reply.status_code == 401, path
        assert reply.json()["error"]["code"] == "invalid_api_key" and MODEL not in reply.text


def test_each_key_sees_only_the_models_it_may_use(auth_stack: Stack, secure_redis: RedisServer) -> None:
    everything = new_key(secure_redis, "doors-all")
    assert grpc_models(auth_stack, everything) == [MODEL]
    assert [m["id"] for m in http_get(auth_stack, "/v1/models", everything).json()["data"]] == [MODEL]
    assert http_get(auth_stack, f"/v1/models/{ALIAS}", everything).json()["id"] == ALIAS

    other = new_key(secure_redis, "doors-other", models="some-other-model")
    assert grpc_models(auth_stack, other) == []
    assert http_get(auth_stack, "/openai/v1/models", other).json()["data"] == []
    for name in (MODEL, ALIAS):  # neither the model nor its alias is revealed: "not found"
        reply = http_get(auth_stack, f"/v1/models/{name}", other)
        assert reply.status_code == 404 and reply.json()["error"]["message"].endswith("(available: )")


def test_reflection_is_off_when_auth_is_on(auth_stack: Stack, secure_redis: RedisServer) -> None:
    key = new_key(secure_redis, "doors-reflection")
    for who in (None, key):
        with pytest.raises(grpc.RpcError) as caught:
            list_services(auth_stack, who)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_reflection_turned_on_with_auth_needs_a_key(secure_redis: RedisServer, tmp_path: Path) -> None:
    stack = Stack(secure_redis, tmp_path, gateway_env={"GATEWAY_AUTH": "on", "GATEWAY_REFLECTION": "on"})
    stack.start_gateway()
    try:
        with pytest.raises(grpc.RpcError) as caught:
            list_services(stack, None)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "chat.v1.ChatService" in list_services(stack, new_key(secure_redis, "doors-reflect-on"))
    finally:
        stack.stop()


def test_the_gateway_warns_at_start_when_auth_is_on_and_tls_is_off(auth_stack: Stack) -> None:
    assert "GATEWAY_AUTH is on but TLS is off" in logs(auth_stack)


def test_a_key_over_its_request_limit_is_refused_before_its_request_is_checked(
    auth_stack: Stack, secure_redis: RedisServer
) -> None:
    key = new_key(secure_redis, "doors-one-rpm", rpm=1)
    with grpc.insecure_channel(auth_stack.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        stub.ChatCompletion(chat_request(max_tokens=1), metadata=bearer(key), timeout=20)
        # Invalid (max_tokens past the context window): telling so would take tokenizing it.
        with pytest.raises(grpc.RpcError) as caught:
            stub.ChatCompletion(chat_request(max_tokens=1_000_000), metadata=bearer(key), timeout=20)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
    assert "requests per minute" in (caught.value.details() or "")


def test_invalid_requests_count_against_the_request_limit(
    auth_stack: Stack, secure_redis: RedisServer
) -> None:
    """Else a key could flood prompts that are refused only after tokenizing, never limited."""
    key = new_key(secure_redis, "doors-invalid-flood", rpm=2)
    codes = []
    with grpc.insecure_channel(auth_stack.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ChatCompletion(chat_request(max_tokens=1_000_000), metadata=bearer(key), timeout=20)
            codes.append(caught.value.code())
    invalid, exhausted = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
    assert codes == [invalid, invalid, exhausted]


def test_an_http_call_without_a_key_is_refused_before_its_body_is_read(auth_stack: Stack) -> None:
    """The body announced is never sent: a gateway that waited to read it would not answer."""
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{auth_stack.http_port}\r\n"
        "Content-Type: application/json\r\n"
        "Content-Length: 60000\r\n\r\n"
        '{"model": "'
    )
    with socket.create_connection(("127.0.0.1", auth_stack.http_port), timeout=5) as conn:
        conn.sendall(head.encode())
        started = time.monotonic()
        try:
            answer = conn.recv(4096).decode()
        except TimeoutError:
            answer = ""
    assert answer.startswith("HTTP/1.1 401"), f"no answer in {time.monotonic() - started:.1f}s: {answer!r}"
