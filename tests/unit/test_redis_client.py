"""Connections to Redis (common/redis_client.py) must not hang on a peer that vanished."""

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError

from common.redis_client import DEFAULT_SOCKET_TIMEOUT_SECONDS, MAX_BLOCK_SECONDS, connect
from devstack.redis_server import RedisServer, free_port
from worker.jobs import JobStream


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = connect(redis_server.url)  # as the worker calls it: no options
    yield client
    await client.aclose()


async def test_connections_have_tcp_keepalive_and_a_socket_timeout(client: Redis) -> None:
    connection = await client.connection_pool.get_connection()
    try:
        sock = connection._writer.transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
        assert connection.socket_timeout == DEFAULT_SOCKET_TIMEOUT_SECONDS > MAX_BLOCK_SECONDS
    finally:
        await client.connection_pool.release(connection)


async def test_a_long_blocking_read_ends_within_the_socket_timeout(client: Redis) -> None:
    jobs = JobStream(client, f"idle-{uuid.uuid4().hex[:8]}", "worker-a")
    await jobs.ensure_group()
    start = time.monotonic()
    assert await jobs.read_new(count=1, block_ms=60_000) == []  # capped: no timeout, no error
    assert time.monotonic() - start < DEFAULT_SOCKET_TIMEOUT_SECONDS


async def test_a_cluster_no_node_of_which_answers_raises_a_redis_error_callers_handle() -> None:
    # redis-py raises RedisClusterException (no RedisError) when it finds no node to load the slot
    # map from; every caller here handles Redis being away as a RedisError.
    client = connect(f"redis-cluster://127.0.0.1:{free_port()}", socket_connect_timeout=0.5)
    try:
        with pytest.raises(ConnectionError, match="Redis Cluster unavailable"):
            await client.get("anything")
    finally:
        await client.aclose()


async def test_a_command_whose_connection_another_task_closes_fails_as_a_connection_error(
    client: Redis,
) -> None:
    # redis-py's cluster client closes every connection of every node, those in use included, when
    # a command meets a failover (a MOVED reply, a connection error). A command another task was
    # sending on one of them got AttributeError from redis-py 8.1.0, which no caller here handles
    # as Redis being away: the gateway answered UNKNOWN. It must be a ConnectionError, which the
    # client's retry and every caller handle.
    connection = await client.connection_pool.get_connection()
    try:
        sending = asyncio.create_task(connection.send_command("PING"))
        await asyncio.sleep(0)  # the send has checked that the connection is open, not written yet
        await connection.disconnect(nowait=True)  # as redis-py closes a connection after an error
        with pytest.raises(ConnectionError):
            await sending
    finally:
        await client.connection_pool.release(connection)
