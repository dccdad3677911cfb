"""Errors tell the caller what failed and a request id, never internals such as Redis' address.

Real Redis clients aimed at a port where nothing listens (the connection is refused, and
redis-py's error text names the host and port), so every Redis call fails as in an outage.
"""

import logging
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from devstack.redis_server import free_port
from gateway.apikeys import KeyRecord
from gateway.auth import Authenticator
from gateway.errors import Unavailable
from gateway.queue import JobQueue
from gateway.ratelimit import RateLimiter
from gateway.validation import ValidRequest

PORT = free_port()
KEY = KeyRecord("k", ("*",), requests_per_minute=10, tokens_per_minute=1000, revoked=False, digest="d")


@pytest.fixture
async def unreachable() -> AsyncIterator[Redis]:
    client = Redis(host="127.0.0.1", port=PORT, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    yield client
    await client.aclose()


def assert_hides_the_address(error: Unavailable, caplog: pytest.LogCaptureFixture, what: str) -> None:
    assert str(PORT) not in error.message and "127.0.0.1" not in error.message, error.message
    assert error.message.startswith(what) and "request id " in error.message
    request_id = error.message.rsplit("request id ", 1)[1].rstrip(")")
    # The detail is in the log, under the same request id, for whoever runs the service.
    assert any(request_id in r.getMessage() and str(PORT) in r.getMessage() for r in caplog.records)


async def test_an_api_key_check_hides_redis(unreachable: Redis, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with pytest.raises(Unavailable) as caught:
        await Authenticator(unreachable, 0).authenticate((("authorization", "Bearer sk-x"),), None)
    assert_hides_the_address(caught.value, caplog, "cannot check the API key")


async def test_a_rate_limit_check_hides_redis(unreachable: Redis, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with pytest.raises(Unavailable) as caught:
        await RateLimiter(unreachable).admit(KEY, 10)
    assert_hides_the_address(caught.value, caplog, "cannot check the rate limit")


async def test_a_submit_hides_redis(unreachable: Redis, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    queue = JobQueue(unreachable, unreachable, "g1", 10)
    request = ValidRequest(
        model="m",
        prompt_token_ids=[1, 2],
        temperature=1.0,
        top_p=1.0,
        max_tokens=2,
        seed=None,
        stop=(),
        json_mode=False,
        user="",
    )
    with pytest.raises(Unavailable) as caught:
        await queue.submit(request, time.time() + 5)
    assert_hides_the_address(caught.value, caplog, "job queue unreachable")
    await queue.stop()
