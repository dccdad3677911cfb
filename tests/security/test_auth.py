"""API keys, per-key rate limits and hard limits on requests, against a real stack."""

import subprocess
import sys
import time

import grpc
import pytest
import redis
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from chat.v1 import chat_pb2, chat_pb2_grpc
from chat_client import Client, PermissionDeniedError
from common import keys
from devstack.redis_server import RedisServer
from tests.integration.stack import MODEL, Stack, chat_request, scrape
from tests.security.conftest import SECRET_CONTENT, logs, new_key


def call(
    stack: Stack, request: chat_pb2.ChatCompletionRequest, key: str | None
) -> tuple[chat_pb2.ChatCompletionResponse, dict[str, str]]:
    with grpc.insecure_channel(stack.address) as channel:
        metadata = (("authorization", f"Bearer {key}"),) if key else ()
        reply, info = chat_pb2_grpc.ChatServiceStub(channel).ChatCompletion.with_call(
            request, metadata=metadata, timeout=20
        )
        return reply, dict(info.initial_metadata())


def refused(stack: Stack, request: chat_pb2.ChatCompletionRequest, key: str | None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(stack, request, key)
    return caught.value


def test_missing_or_unknown_key_is_unauthenticated(auth_stack: Stack) -> None:
    assert refused(auth_stack, chat_request(max_tokens=2), None).code() == grpc.StatusCode.UNAUTHENTICATED
    error = refused(auth_stack, chat_request(max_tokens=2), "sk-chat-not-a-real-key")
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "unknown API key" in error.details()


def test_revoked_key_and_forbidden_model_are_permission_denied(
    auth_stack: Stack, secure_redis: RedisServer
) -> None:
    key = new_key(secure_redis, "to-revoke")
    assert call(auth_stack, chat_request(max_tokens=2), key)[0].usage.completion_tokens == 2
    subprocess.run(
        [sys.executable, "-m", "gateway.apikeys", "revoke", "--name", "to-revoke"],
        env={"REDIS_URL": secure_redis.url, "PATH": ""}, check=True, capture_output=True,
    )  # fmt: skip
    assert refused(auth_stack, chat_request(max_tokens=2), key).code() == grpc.StatusCode.PERMISSION_DENIED
    other = new_key(secure_redis, "other-models-only", models="some-other-model")
    error = refused(auth_stack, chat_request(max_tokens=2), other)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and MODEL in error.details()
    with Client(auth_stack.address, api_key=other) as client, pytest.raises(PermissionDeniedError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )


def test_cli_prints_the_key_once_and_stores_only_its_hash(
    secure_redis: RedisServer, redis_admin: redis.Redis
) -> None:
    env = {"REDIS_URL": secure_redis.url, "PATH": ""}
    created = subprocess.run(
        [sys.executable, "-m", "gateway.apikeys", "create", "--name", "cli-made", "--rpm", "5"],
        env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    key = created.stdout.strip()
    assert key.startswith("sk-chat-") and len(key) > 40
    listed = subprocess.run(
        [sys.executable, "-m", "gateway.apikeys", "list"], env=env, check=True, capture_output=True, text=True
    ).stdout
    assert "cli-made\tactive" in listed and key not in listed
    stored = b"".join(v for k in redis_admin.scan_iter("chat:apikey*") for v in _values(redis_admin, k))
    assert key.encode() not in stored


def _values(client: redis.Redis, key: bytes) -> list[bytes]:
    kind = client.type(key)
    return list(client.hgetall(key).values()) if kind == b"hash" else []


def test_a_burst_past_the_request_limit_is_refused_with_retry_info_and_budget(
    auth_stack: Stack, secure_redis: RedisServer
) -> None:
    key = new_key(secure_redis, "burst", rpm=3)
    remaining = [
        int(call(auth_stack, chat_request(max_tokens=1), key)[1]["x-ratelimit-remaining-requests"])
        for _ in range(3)
    ]
    assert remaining == [2, 1, 0]
    error = refused(auth_stack, chat_request(max_tokens=1), key)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "requests per minute" in error.details()
    retry = error_details_pb2.RetryInfo()
    status = rpc_status.from_call(error)
    assert status is not None and status.details[0].Unpack(retry)
    assert 0 < retry.retry_delay.ToTimedelta().total_seconds() <= 60
    trailers = dict(error.trailing_metadata())
    assert trailers["x-ratelimit-remaining-requests"] == "0" and trailers["x-ratelimit-limit-requests"] == "3"
    assert trailers["x-ratelimit-reset-requests"].endswith("s")


def test_a_long_generation_uses_up_the_token_limit(auth_stack: Stack, secure_redis: RedisServer) -> None:
    key = new_key(secure_redis, "tokens", tpm=150)
    reply, budget = call(auth_stack, chat_request(max_tokens=100), key)
    used = reply.usage.total_tokens
    assert int(budget["x-ratelimit-remaining-tokens"]) == 150 - (reply.usage.prompt_tokens + 100)  # reserved
    error = refused(auth_stack, chat_request(max_tokens=100), key)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens per minute" in error.details()
    assert int(dict(error.trailing_metadata())["x-ratelimit-remaining-tokens"]) == 150 - used


def test_two_gateways_share_one_limit(auth_stack: Stack, secure_redis: RedisServer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    second = Stack(secure_redis, tmp_path, gateway_env=dict(auth_stack.gateway_env))
    second.start_gateway()
    try:
        key = new_key(secure_redis, "shared", rpm=4)
        for stack in (auth_stack, second, auth_stack, second):
            call(stack, chat_request(max_tokens=1), key)
        for stack in (auth_stack, second):
            assert (
                refused(stack, chat_request(max_tokens=1), key).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            )
    finally:
        second.stop()


@pytest.mark.parametrize(
    ("request_fields", "code", "words"),
    [
        ({"content": "x" * 70_000}, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
        ({"content": "x" * 2_500}, grpc.StatusCode.INVALID_ARGUMENT, "at most 2000 characters"),
        (
            {"messages": [chat_pb2.ChatMessage(role="user", content="hi")] * 9},
            grpc.StatusCode.INVALID_ARGUMENT,
            "at most 8 messages",
        ),
    ],
)
def test_requests_over_a_hard_limit_are_refused_naming_it(
    auth_stack: Stack,
    secure_redis: RedisServer,
    request_fields: dict,
    code: grpc.StatusCode,
    words: str,  # type: ignore[type-arg]
) -> None:
    key = new_key(secure_redis, f"limits-{code.name}-{words[:12]}")
    error = refused(auth_stack, chat_request(max_tokens=1, **request_fields), key)
    assert error.code() == code and words in error.details()


def test_streams_on_one_connection_are_capped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Its own Redis: the module's flat-out worker must not take these jobs.
    own_redis = RedisServer(tmp_path / "redis")
    own_redis.start()
    stack = Stack(
        own_redis, tmp_path,
        gateway_env={"GATEWAY_MAX_STREAMS_PER_CONNECTION": "2"},
        worker_env={"WORKER_ENGINE": "bench", "WORKER_BENCH_TOKENS_PER_SECOND": "20"},
    )  # fmt: skip
    stack.start_gateway()
    stack.start_worker()
    try:
        stack.wait_worker_ready()
        with grpc.insecure_channel(stack.address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            long_request = chat_request(max_tokens=200)
            long_calls = [stub.StreamChatCompletion(long_request, timeout=30) for _ in range(2)]
            for c in long_calls:
                next(iter(c))  # both hold a stream now
            third = stub.StreamChatCompletion(chat_request(max_tokens=5), timeout=30)
            time.sleep(1.5)  # the third call waits for a free stream while the first two generate
            assert scrape(stack.gateway_metrics_port)["chat_gateway_open_calls{}"] == 2
            long_calls[0].cancel()  # frees a stream: the third call goes through
            assert "".join(c.choices[0].delta.content for c in third).strip()
            long_calls[1].cancel()
    finally:
        stack.stop()
        own_redis.stop()


def test_secrets_and_message_contents_never_reach_the_logs(
    auth_stack: Stack, secure_redis: RedisServer
) -> None:
    key = new_key(secure_redis, "logging")
    call(auth_stack, chat_request(SECRET_CONTENT, max_tokens=2), key)
    refused(auth_stack, chat_request(SECRET_CONTENT, temperature=5.0), key)
    refused(auth_stack, chat_request(SECRET_CONTENT), key + "x")
    text = logs(auth_stack)
    assert text  # the processes did log
    assert SECRET_CONTENT not in text and key not in text and key[8:] not in text
    assert not list(redis.Redis.from_url(secure_redis.url).scan_iter(f"{keys.PREFIX}:cancel:*"))


def test_a_keys_default_tier_serves_its_requests_that_name_none(
    auth_stack: Stack, secure_redis: RedisServer
) -> None:
    batch = new_key(secure_redis, "nightly-batch", tier="flex")
    for tier in (None, "auto", "default"):  # the default, as each SDK may name it
        request = chat_request(max_tokens=2, **({"service_tier": tier} if tier else {}))
        assert call(auth_stack, request, batch)[0].service_tier == "flex", tier
    # Named, a tier is served as named; and a key without a default tier is served on demand.
    assert (
        call(auth_stack, chat_request(max_tokens=2, service_tier="on_demand"), batch)[0].service_tier
        == "on_demand"
    )
    interactive = new_key(secure_redis, "interactive")
    assert call(auth_stack, chat_request(max_tokens=2), interactive)[0].service_tier == "on_demand"
    listed = subprocess.run(
        [sys.executable, "-m", "gateway.apikeys", "list"],
        env={"REDIS_URL": secure_redis.url, "PATH": ""}, check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert "nightly-batch\tactive" in listed.stdout and "tier=flex" in listed.stdout
    with pytest.raises(subprocess.CalledProcessError) as bad:
        subprocess.run(
            [sys.executable, "-m", "gateway.apikeys", "create", "--name", "x", "--tier", "scale"],
            env={"REDIS_URL": secure_redis.url, "PATH": ""}, check=True, capture_output=True, text=True,
        )  # fmt: skip
    assert "argument --tier: invalid choice: 'scale'" in bad.value.stderr
