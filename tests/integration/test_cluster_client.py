"""Redis Cluster: REDIS_URL redis-cluster://, through connect() (common/redis_client.py).

A cluster of 3 primaries for most tests, and one of 3 primaries with a replica each for WAIT
and failovers (devstack/redis_cluster.py: each starts in some 2 s; node timeout 1 s). The
failover that kills a node runs last.
"""

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import CrossSlotTransactionError, RedisClusterException, RedisError

from common import keys
from common.redis_client import connect, is_cluster
from devstack.redis_cluster import LocalRedisCluster
from devstack.redis_server import RedisServer
from gateway import metrics
from gateway.queue import JobQueue
from tests.unit.queue_helpers import deadline, valid_request

PASSWORD = "cluster:pw@1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    cluster = LocalRedisCluster(Path(tmp_path_factory.mktemp("cluster")), password=PASSWORD)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    cluster = LocalRedisCluster(Path(tmp_path_factory.mktemp("replicated")), replicas=1)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
async def client(cluster: LocalRedisCluster) -> AsyncIterator[Redis]:
    client = connect(cluster.url)
    yield client
    await client.aclose()


def tag() -> str:
    """A fresh hash tag: keys with it share a slot."""
    return "{" + uuid.uuid4().hex[:8] + "}"


def reset_stats(cluster: LocalRedisCluster) -> None:
    for node in cluster.running():
        with cluster.client(node) as plain:
            plain.config_resetstat()


def calls(cluster: LocalRedisCluster, command: str) -> int:
    """How often the nodes ran the command since reset_stats(), all together."""
    total = 0
    for node in cluster.running():
        with cluster.client(node) as plain:
            total += plain.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)
    return total


async def test_keys_on_every_primary_are_written_and_read_where_they_live(
    cluster: LocalRedisCluster, client: Redis
) -> None:
    assert is_cluster(client) and is_cluster(cluster.url)
    keys = cluster.keys_on_each_primary(f"k-{uuid.uuid4().hex[:8]}")
    assert len(keys) == 3
    for port, key in keys.items():
        assert await client.set(key, port)
    for port, key in keys.items():
        assert await client.get(key) == str(port).encode()
        with cluster.client(cluster.by_port(port)) as plain:
            assert plain.get(key) == str(port).encode()  # on that node itself, no redirection


async def test_a_registered_script_runs_over_keys_that_share_a_hash_tag(
    cluster: LocalRedisCluster, client: Redis
) -> None:
    script = client.register_script(
        "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCRBY', KEYS[2], ARGV[1])"
    )
    t = tag()
    assert await script(keys=[f"{t}a", f"{t}b"], args=[5]) == 5
    assert await script(keys=[f"{t}a", f"{t}b"], args=[2]) == 7
    # A node that has not seen the script (as a replica just promoted): loaded there, then run.
    with cluster.client(cluster.primary_for(f"{t}a")) as plain:
        plain.script_flush()
    assert await script(keys=[f"{t}a", f"{t}b"], args=[1]) == 8
    # Keys in different slots: refused before anything is sent.
    with pytest.raises(RedisClusterException, match="same key slot"):
        await script(keys=[f"{tag()}a", f"{tag()}b"], args=[1])


async def test_a_pipeline_without_transaction_spans_slots_and_nodes(
    cluster: LocalRedisCluster, client: Redis
) -> None:
    keys = list(cluster.keys_on_each_primary(f"p-{uuid.uuid4().hex[:8]}").values())
    async with client.pipeline(transaction=False) as pipe:
        for i, key in enumerate(keys):
            pipe.set(key, i)
            pipe.incr(key)
        for key in keys:
            pipe.get(key)
        results = await pipe.execute()
    assert results == [True, 1, True, 2, True, 3, b"1", b"2", b"3"]


async def test_a_transaction_runs_on_one_slot(client: Redis) -> None:
    t = tag()
    async with client.pipeline(transaction=True) as pipe:
        pipe.set(f"{t}a", 1)
        pipe.incrby(f"{t}b", 2)
        pipe.get(f"{t}a")  # pipe.mget() is blocked in a cluster pipeline, transaction or not
        pipe.get(f"{t}b")
        assert await pipe.execute() == [True, 2, b"1", b"2"]
    with pytest.raises(CrossSlotTransactionError):
        async with client.pipeline(transaction=True) as pipe:
            pipe.set(f"{tag()}a", 1)
            pipe.set(f"{tag()}b", 1)
            await pipe.execute()


async def test_xread_blocks_until_an_entry_comes(cluster: LocalRedisCluster, client: Redis) -> None:
    stream = f"{tag()}stream"
    await client.xadd(stream, {"n": 0})
    reset_stats(cluster)
    reading = asyncio.create_task(client.xread({stream: "$"}, block=3000))
    await asyncio.sleep(0.2)
    assert not reading.done()
    start = time.monotonic()
    await client.xadd(stream, {"n": 1})
    [[name, [(_entry_id, fields)]]] = await asyncio.wait_for(reading, 2)
    assert (name, fields) == (stream.encode(), {b"n": b"1"})
    assert time.monotonic() - start < 1
    # Its slot found here, without asking a node for the keys (redis-py's COMMAND GETKEYS).
    assert calls(cluster, "command|getkeys") == 0
    assert calls(cluster, "xread") == 1


async def test_wait_after_a_script_in_one_pipeline_counts_the_scripts_write(
    replicated: LocalRedisCluster,
) -> None:
    # What gateway/queue.py needs in a cluster: the submit script, then WAIT on its connection.
    client = connect(replicated.url)
    try:
        assert isinstance(client, RedisCluster)
        key = f"{tag()}job"
        script = client.register_script("return redis.call('INCR', KEYS[1])")
        await script(keys=[key])  # loads it on the key's node
        replica = replicated.replica_of(replicated.primary_for(key))

        async def submit() -> list[object]:
            node = client.get_node_from_key(key)
            async with client.pipeline(transaction=False) as pipe:
                # Commands for one node go down one connection, in order; CLIENT ID shows which.
                pipe.execute_command("CLIENT", "ID", target_nodes=node)
                # pipe.evalsha() is blocked in a cluster pipeline; the raw command is not.
                pipe.execute_command("EVALSHA", script.sha, 1, key)
                # WAIT has no key: target_nodes puts it on the script's node (else: the default one).
                pipe.execute_command("WAIT", 1, 200, target_nodes=node)
                pipe.execute_command("CLIENT", "ID", target_nodes=node)
                before, added, replicated_to, after = await pipe.execute(raise_on_error=False)
            assert before == after  # one connection
            assert client.get_node_from_key(key) is node  # the slot did not move meanwhile
            return [added, replicated_to]

        assert await submit() == [2, 1]
        # The replica stalls: the WAIT times out, the replica does not have the script's write.
        freezing = asyncio.create_task(asyncio.to_thread(replicated.freeze, replica, 0.6))
        await asyncio.sleep(0.1)
        start = time.monotonic()
        assert await submit() == [3, 0]
        assert time.monotonic() - start >= 0.2
        await freezing
        assert await submit() == [4, 1]
    finally:
        await client.aclose()


async def test_a_client_follows_a_manual_failover(replicated: LocalRedisCluster) -> None:
    # The old primary stays up as a replica and answers MOVED: the client follows it.
    client = connect(replicated.url)
    try:
        key = f"{tag()}k"
        await client.set(key, "before")
        old = replicated.primary_for(key)
        replicated.failover(replicated.replica_of(old))
        assert replicated.primary_for(key).port != old.port
        start = time.monotonic()
        assert await client.get(key) == b"before"  # MOVED, then from the new primary
        assert await client.set(key, "after")
        assert time.monotonic() - start < 0.5
        with replicated.client(replicated.primary_for(key)) as plain:
            assert plain.get(key) == b"after"
    finally:
        await client.aclose()


async def test_a_client_follows_a_failover_within_seconds(replicated: LocalRedisCluster) -> None:
    # Two clients, as a gateway or worker has: one writes to the key all along; the other only
    # reads a stream on another node, and had the killed node for its default one.
    writer = connect(replicated.url, socket_timeout=2)
    reader = connect(replicated.url, socket_timeout=2)
    try:
        assert isinstance(reader, RedisCluster) and isinstance(writer, RedisCluster)
        await reader.ping()
        victim = replicated.by_port(int(reader.get_default_node().port))
        keys = replicated.keys_on_each_primary(f"f-{uuid.uuid4().hex[:8]}")
        key = keys[victim.port]
        stream = next(k for port, k in keys.items() if port != victim.port) + "-stream"
        await reader.xadd(stream, {"n": 1})
        async with writer.pipeline(transaction=False) as pipe:
            pipe.set(key, -1)
            pipe.execute_command("WAIT", 1, 1000, target_nodes=writer.get_node_from_key(key))
            assert await pipe.execute() == [True, 1]  # on the replica too before the kill

        written: list[tuple[float, int]] = []  # when each write succeeded, and its value
        errors: list[str] = []

        async def write() -> None:
            i = 0
            while True:
                try:
                    await writer.set(key, i)
                    written.append((time.monotonic(), i))
                except RedisError as exc:
                    errors.append(type(exc).__name__)
                i += 1
                await asyncio.sleep(0.01)

        writing = asyncio.create_task(write())
        await asyncio.sleep(0.2)
        killed_at = time.monotonic()
        replicated.kill(victim)
        promotion = await asyncio.to_thread(replicated.wait_ok, 15)
        promoted_at = time.monotonic()
        # The reader's first command since: no write made its client reload the slot map.
        assert await asyncio.wait_for(reader.xread({stream: "0"}, count=1), 2)
        deadline = promoted_at + 3
        while not written or written[-1][0] < promoted_at:
            assert time.monotonic() < deadline, f"no write since the promotion; errors: {errors[-3:]}"
            await asyncio.sleep(0.01)
        writing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writing
        times = [killed_at] + [at for at, _ in written if at >= killed_at]
        stall = max(b - a for a, b in itertools.pairwise(times))
        after_promotion = next(at for at, _ in written if at >= promoted_at) - promoted_at
        print(
            f"promoted {promotion:.2f}s after the kill; longest stall of writes {stall:.2f}s, first write "
            f"{after_promotion * 1000:.0f} ms after the promotion; {len(errors)} failed writes: {set(errors)}"
        )
        assert after_promotion < 1.0
        # The reader's map still names the killed node for the key: a transaction (which retries
        # on its own, not as commands do) finds the promoted replica within the call.
        async with reader.pipeline(transaction=True) as pipe:
            pipe.get(key)
            pipe.expire(key, 600)
            assert await pipe.execute() == [str(written[-1][1]).encode(), True]
        assert await reader.get(key) == str(written[-1][1]).encode()
        new_primary = replicated.primary_for(key)
        assert new_primary.port != victim.port
        with replicated.client(new_primary) as plain:
            assert plain.get(key) == str(written[-1][1]).encode()
    finally:
        await writer.aclose()
        await reader.aclose()


async def test_a_gateways_submit_waits_for_the_replica_of_its_job_streams_shard(
    replicated: LocalRedisCluster,
) -> None:
    # GATEWAY_SUBMIT_REPLICAS on a cluster: the WAIT must run on the job stream's node, after
    # the submit's own write there (gateway/queue.py _queue_job).
    client = connect(replicated.url)
    queue = JobQueue(client, client, f"gw-{uuid.uuid4().hex[:6]}", 100, submit_replicas=1, submit_wait_ms=300)
    try:
        await queue.start()
        # A model whose job stream's shard has a replica (the failover tests before this one may
        # have left a shard without one).
        request, replica = next(
            (r, replica)
            for r in (valid_request() for _ in range(100))
            if (replica := replica_or_none(replicated, keys.job_stream(r.model))) is not None
        )
        unreplicated = metrics.UNREPLICATED_SUBMITS._value.get()
        queue.release(await queue.submit(request, deadline()))
        assert metrics.UNREPLICATED_SUBMITS._value.get() == unreplicated  # the replica had it
        stream = keys.job_stream(request.model)
        freezing = asyncio.create_task(asyncio.to_thread(replicated.freeze, replica, 0.8))
        await asyncio.sleep(0.1)
        subscription = await queue.submit(request, deadline())  # queued all the same, and counted
        queue.release(subscription)
        await freezing
        assert metrics.UNREPLICATED_SUBMITS._value.get() == unreplicated + 1
        assert await client.xlen(stream) == 2
    finally:
        await queue.stop()
        await client.aclose()


def replica_or_none(cluster: LocalRedisCluster, key: str) -> RedisServer | None:
    try:
        return cluster.replica_of(cluster.primary_for(key))
    except RuntimeError:
        return None
