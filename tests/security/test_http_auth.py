"""API keys and per-key rate limits on the HTTP API: the same keys and budgets as gRPC."""

import groq
import httpx
import openai
import pytest

from devstack.redis_server import RedisServer
from tests.integration.stack import MODEL, Stack
from tests.security.conftest import new_key

HI = [{"role": "user", "content": "hi"}]


def client(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key=key, max_retries=0)


def test_missing_or_unknown_key_is_401(auth_stack: Stack) -> None:
    with (
        client(auth_stack, "sk-chat-not-a-real-key") as c,
        pytest.raises(openai.AuthenticationError) as caught,
    ):
        c.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)  # type: ignore[arg-type]
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    body = {"model": MODEL, "messages": HI, "max_tokens": 1}
    reply = httpx.post(f"{auth_stack.http_url}/openai/v1/chat/completions", json=body)  # no Authorization
    assert reply.status_code == 401 and "missing API key" in reply.json()["error"]["message"]
    with (
        groq.Groq(base_url=auth_stack.http_url, api_key="sk-wrong", max_retries=0) as g,
        pytest.raises(groq.AuthenticationError),
    ):
        g.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)  # type: ignore[arg-type]


def test_a_key_for_other_models_is_403(auth_stack: Stack, secure_redis: RedisServer) -> None:
    key = new_key(secure_redis, "http-other-models", models="some-other-model")
    with client(auth_stack, key) as c, pytest.raises(openai.PermissionDeniedError) as caught:
        c.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)  # type: ignore[arg-type]
    assert caught.value.status_code == 403 and MODEL in caught.value.message


def test_over_the_request_limit_is_429_with_the_budget_headers(
    auth_stack: Stack, secure_redis: RedisServer
) -> None:
    key = new_key(secure_redis, "http-burst", rpm=2, tpm=10_000)
    with client(auth_stack, key) as c:
        raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=HI, max_tokens=1)  # type: ignore[arg-type]
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
        assert raw.headers["x-ratelimit-remaining-requests"] == "1"
        assert raw.headers["x-ratelimit-limit-tokens"] == "10000"
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
        assert raw.parse().usage is not None
        stream = c.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, stream=True)  # type: ignore[arg-type]
        assert stream.response.headers["x-ratelimit-remaining-requests"] == "0"
        assert list(stream)[-1].choices[0].finish_reason == "length"
        with pytest.raises(openai.RateLimitError) as caught:
            c.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)  # type: ignore[arg-type]
    error = caught.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    headers = error.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60 and headers["x-should-retry"] == "true"
    assert headers["x-ratelimit-remaining-requests"] == "0" and headers["x-ratelimit-limit-requests"] == "2"
    assert "x-ratelimit-reset-tokens" in headers and "x-ratelimit-remaining-tokens" in headers


def test_a_request_larger_than_the_keys_tpm_is_400_naming_max_tokens(
    auth_stack: Stack, secure_redis: RedisServer
) -> None:
    key = new_key(secure_redis, "http-small-tpm", tpm=50)
    with client(auth_stack, key) as c, pytest.raises(openai.BadRequestError) as caught:
        c.chat.completions.create(model=MODEL, messages=HI, max_completion_tokens=100)  # type: ignore[arg-type]
    assert caught.value.param == "max_completion_tokens" and "50 tokens per minute" in caught.value.message


def test_the_key_is_checked_before_the_body(auth_stack: Stack) -> None:
    reply = httpx.post(f"{auth_stack.http_url}/v1/chat/completions", content=b"{not json")
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
