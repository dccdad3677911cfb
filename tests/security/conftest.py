"""A stack with GATEWAY_AUTH=on: its own redis-server, a gateway, a benchmark-engine worker."""

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from common import keys
from devstack.redis_server import RedisServer
from gateway import apikeys
from tests.integration.stack import Stack, leaks

SECRET_CONTENT = "SECRET-CONTENT-7f3a"  # must never appear in any log


@pytest.fixture(scope="module")
def secure_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("secure-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def auth_stack(secure_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        secure_redis,
        tmp_path_factory.mktemp("secure-logs"),
        gateway_env={
            "GATEWAY_AUTH": "on",
            "GATEWAY_AUTH_CACHE_SECONDS": "0",
            "GATEWAY_MAX_REQUEST_BYTES": "65536",
            "GATEWAY_MAX_MESSAGES": "8",
            "GATEWAY_MAX_PROMPT_CHARS": "2000",
        },
        worker_env={"WORKER_ENGINE": "bench", "WORKER_BENCH_TOKENS_PER_SECOND": "0"},
    )
    stack.start_gateway()
    stack.start_worker()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def redis_admin(secure_redis: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(secure_redis.url)
    yield client
    client.close()


def new_key(
    server: RedisServer, name: str, models: str = "*", rpm: int = 0, tpm: int = 0, tier: str = "on_demand"
) -> str:
    async def create() -> str:
        client = redis.asyncio.Redis.from_url(server.url)
        try:
            return await apikeys.create(client, name, models.split(","), rpm, tpm, tier)
        finally:
            await client.aclose()

    return asyncio.run(create())


def logs(stack: Stack) -> str:
    return "".join(p.read_text() for p in Path(stack.log_dir).glob("*.log"))


def assert_only_accounting_left(client: redis.Redis, timeout: float = 10.0) -> None:
    """No job, cancel flag, progress record or unfinished idempotency key left, once the calls
    ended (keys, their rate-limit windows and retry markers are the limiter's, and stay)."""
    kinds = ("apikey", "ratelimit", "applied")
    accounting = (f"stray key {keys.API_KEY_NAMES}", *(f"stray key {keys.PREFIX}:{k}:" for k in kinds))
    end = time.monotonic() + timeout
    while (problems := [p for p in leaks(client) if not p.startswith(accounting)]) and time.monotonic() < end:
        time.sleep(0.1)
    assert not problems


@pytest.fixture
def fresh_minute() -> None:
    """Refunds land only in the minute their call was admitted: start well inside one."""
    left = 60 - time.time() % 60
    if left < 20:
        time.sleep(left + 0.5)
