"""Fixtures of the unit tests that talk to a real redis-server (session-wide, tests/conftest.py)."""

from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from redis.asyncio import Redis

from devstack.redis_server import RedisServer
from tests.tcp_proxy import TcpProxy
from worker.publisher import EventPublisher


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A plain asyncio client of the session's redis-server (tests that need options make their own)."""
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def publisher(client: Redis) -> AsyncIterator[EventPublisher]:
    """The worker's event publisher, running, on `client`."""
    publisher = EventPublisher(client)
    publisher.start()
    yield publisher
    await publisher.stop()


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the redis-server, to hold replies back or go silent."""
    with TcpProxy(redis_server.port) as proxy:
        yield proxy


@pytest.fixture
def direct(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client that bypasses the proxy, to look at what Redis really holds."""
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()
