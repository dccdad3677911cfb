"""A Redis Cluster primary fails over (CLUSTER FAILOVER, or SIGKILL) under load: nothing hangs.

A real cluster of three primaries with a replica each (node timeout 1 s); gateway and worker on
redis-cluster:// with three job streams. The primary that fails is the one holding the
gateway's slot: its reply stream, and the progress records and completion logs of all its jobs
(common/keys.py). Streams are in flight and short unary calls keep coming while the slot moves;
every call must end completed, exactly, or UNAVAILABLE (retryable), well before its deadline,
as on Sentinel (tests/faults/test_sentinel_failover.py, whose load and checks are reused).
"""

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.cluster import RedisCluster as SyncRedisCluster

from common import keys
from devstack.redis_cluster import LocalRedisCluster
from devstack.redis_server import RedisServer
from tests.faults.conftest import BENCH_WORKER_ENV, GATEWAY_ENV
from tests.faults.test_sentinel_failover import check_clean, under_load
from tests.integration.stack import Stack, print_log_tails

GATEWAY_ID = "cluster-failover-gateway"
CLUSTER_ENV = {"REDIS_JOB_STREAMS": "3"}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalRedisCluster]:
    cluster = LocalRedisCluster(tmp_path / "cluster", primaries=3, replicas=1)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_stack(cluster: LocalRedisCluster, tmp_path: Path) -> Iterator[Stack]:
    worker_env = {**BENCH_WORKER_ENV, **CLUSTER_ENV, "WORKER_MAX_CONCURRENCY": "32"}
    gateway_env = {**GATEWAY_ENV, **CLUSTER_ENV, "GATEWAY_ID": GATEWAY_ID}
    stack = Stack(cluster, tmp_path, gateway_env=gateway_env, worker_env=worker_env)
    try:
        stack.start_worker()
        stack.start_gateway()
        stack.wait_worker_ready(timeout=60)
        yield stack
    finally:
        stack.stop()
        print_log_tails(tmp_path)


def gateways_primary(cluster: LocalRedisCluster) -> RedisServer:
    return cluster.primary_for(keys.reply_stream(GATEWAY_ID))


def check_every_shard_clean(stack: Stack, cluster: LocalRedisCluster) -> None:
    with SyncRedisCluster(host="127.0.0.1", port=cluster.running()[0].port) as client:
        check_clean(stack, client)  # type: ignore[arg-type]  # the same commands, every shard scanned


def serves_the_gateways_slot(cluster: LocalRedisCluster, node: RedisServer) -> None:
    """Returns once `node` serves the gateway's slot and the cluster is ok."""
    end = time.monotonic() + 30
    while True:
        try:
            if gateways_primary(cluster).port == node.port:
                break
        except RuntimeError:  # the slot is served by nobody until the replica is promoted
            pass
        assert time.monotonic() < end, "the replica was not promoted"
        time.sleep(0.05)
    cluster.wait_ok(timeout=30)


def test_cluster_failover_of_the_gateways_shard_under_load(
    cluster_stack: Stack, cluster: LocalRedisCluster
) -> None:
    replica = cluster.replica_of(gateways_primary(cluster))

    def failover() -> None:  # asked, not waited for: the calls go on meanwhile
        with cluster.client(replica) as client:
            client.execute_command("CLUSTER", "FAILOVER")

    asyncio.run(under_load(cluster_stack, failover, lambda: serves_the_gateways_slot(cluster, replica)))
    check_every_shard_clean(cluster_stack, cluster)


def test_sigkill_of_the_gateways_primary_under_load(cluster_stack: Stack, cluster: LocalRedisCluster) -> None:
    primary = gateways_primary(cluster)
    replica = cluster.replica_of(primary)
    asyncio.run(
        under_load(
            cluster_stack, lambda: cluster.kill(primary), lambda: serves_the_gateways_slot(cluster, replica)
        )
    )
    check_every_shard_clean(cluster_stack, cluster)
