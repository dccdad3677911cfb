"""Redis through Sentinel: REDIS_URL redis+sentinel://, with passwords on data nodes and sentinels.

Each test gets its own topology (devstack/redis_sentinel.py: a primary, a replica, three
sentinels with quorum 2; it starts in well under a second). Workers run the benchmark engine.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from redis.asyncio import Redis

from chat.v1 import chat_pb2_grpc
from common import redis_client
from common.redis_client import PRIMARY_CHECK_SECONDS, connect
from devstack.redis_sentinel import RedisSentinel
from tests.integration.stack import Stack, assert_nothing_leaked, chat_request, stream_text


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[RedisSentinel]:
    topology = RedisSentinel(tmp_path / "redis", password="data:pw@1", sentinel_password="sentinel-pw")
    topology.start()
    yield topology
    topology.stop()


@pytest.fixture
async def client(topology: RedisSentinel) -> AsyncIterator[Redis]:
    client = connect(topology.url, socket_timeout=2)
    yield client
    await client.aclose()


async def failed_over(topology: RedisSentinel) -> tuple[int, int]:
    """SENTINEL FAILOVER; returns (old, new) primary port once every sentinel names the new one."""
    old = topology.primary_port()
    topology.failover()
    await asyncio.to_thread(topology.wait_primary_moved, old)
    return old, topology.primary_port()


async def test_clients_leave_an_old_primary_the_sentinels_no_longer_name(
    topology: RedisSentinel, client: Redis
) -> None:
    key = f"k-{uuid.uuid4().hex[:8]}"
    await client.set(key, "before")
    old, new = await failed_over(topology)
    # Sentinel demotes the old primary some 10 s after the failover; until then it still takes
    # writes, which the new primary would never see.
    with topology.node(old) as node:
        assert node.info("replication")["role"] == "master"
    await asyncio.sleep(PRIMARY_CHECK_SECONDS)
    # The first command after the interval starts the check, in the background (no command waits
    # for the sentinels); those after it go to the primary the sentinels name.
    await client.ping()
    await asyncio.sleep(0.3)
    await client.set(key, "after")
    with topology.node(new) as node:
        assert node.get(key) == b"after"
    with topology.node(old) as node:
        assert node.get(key) == b"before"


async def test_a_demoted_primary_answering_readonly_sends_the_command_to_the_new_one(
    topology: RedisSentinel, client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The periodic check off: only the READONLY answer can tell the connection it is stale.
    monkeypatch.setattr(redis_client, "PRIMARY_CHECK_SECONDS", 3600.0)
    key = f"k-{uuid.uuid4().hex[:8]}"
    await client.set(key, "before")  # a pooled connection to the primary
    old, new = await failed_over(topology)
    with topology.node(old) as node:
        # Demoted as Sentinel does it, except that its clients are not disconnected.
        node.replicaof("127.0.0.1", new)
        assert node.info("replication")["role"] == "slave"
    start = time.monotonic()
    await client.set(key, "after")  # READONLY, reconnect through the sentinels, retried there
    took = time.monotonic() - start
    with topology.node(new) as node:
        assert node.get(key) == b"after"
    print(f"a write on a connection to the demoted primary went to the new one in {took * 1000:.0f} ms")


def test_gateway_and_worker_serve_through_sentinel(topology: RedisSentinel, tmp_path: Path) -> None:
    stack = Stack(
        topology,
        tmp_path,
        gateway_env={"GATEWAY_DEFAULT_MAX_TOKENS": "8"},
        worker_env={"WORKER_ENGINE": "bench", "WORKER_BENCH_TOKENS_PER_SECOND": "0"},
    )
    try:
        stack.start_gateway()
        stack.start_worker()
        stack.wait_worker_ready(timeout=30)
        with grpc.insecure_channel(stack.address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            reply = stub.ChatCompletion(chat_request(max_tokens=4), timeout=10)
            assert reply.choices[0].message.content == "t1 t2 t3 t4 "
            chunks = list(stub.StreamChatCompletion(chat_request(max_tokens=6), timeout=10))
            assert stream_text(chunks) == "t1 t2 t3 t4 t5 t6 "
        with topology.node(topology.primary_port()) as primary:
            assert_nothing_leaked(primary, stack.worker_metrics_ports)
    finally:
        stack.stop()
