"""Fault tests: real redis-server, gateway and worker processes, killed and restarted on purpose.

Workers run the benchmark engine (token i of a reply is `t{i} `), a stand-in for the model
that makes generations fast and their text predictable, so a resumed stream can be
checked token by token, with the default heartbeat and claim timeout (0.5 s and 2 s).
Each test gets its own redis-server and processes.
"""

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from common import keys
from devstack.redis_server import RedisServer
from tests.integration.stack import Stack, assert_nothing_leaked, leaks, print_log_tails, running_requests

BENCH_WORKER_ENV = {
    "WORKER_ENGINE": "bench",
    "WORKER_BENCH_TOKENS_PER_SECOND": "20",
    "WORKER_CANCEL_POLL_SECONDS": "0.05",
    "WORKER_DRAIN_SECONDS": "5",
}
GATEWAY_ENV = {"GATEWAY_DEFAULT_MAX_TOKENS": "16", "GATEWAY_SHUTDOWN_GRACE_SECONDS": "10"}


@pytest.fixture
def fault_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fault_stack(fault_redis: RedisServer, tmp_path: Path) -> Iterator[Stack]:
    """Nothing started yet: each test starts the gateway and workers it needs."""
    stack = Stack(fault_redis, tmp_path, gateway_env=dict(GATEWAY_ENV), worker_env=dict(BENCH_WORKER_ENV))
    try:
        yield stack
    finally:
        stack.stop()
        print_log_tails(tmp_path)


@pytest.fixture
def fault_redis_client(fault_redis: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(fault_redis.url)
    yield client
    client.close()


def bench_text(n: int) -> str:
    """What the benchmark engine generates for max_tokens=n."""
    return "".join(f"t{i} " for i in range(1, n + 1))


def check_clean(
    stack: Stack, client: redis.Redis, expiring_progress_ok: bool = False, timeout: float = 15.0
) -> None:
    """Nothing left behind. expiring_progress_ok: a progress record that expires by itself is no
    leak, where a worker or Redis was killed at a random moment: ending a job takes steps in two
    slots (worker/jobs.py _END_OWNED), and a worker killed between them, or a job whose entry was
    lost with a primary, leaves its record to expire a minute after the job's deadline."""
    ports = [p for p, w in zip(stack.worker_metrics_ports, stack.workers, strict=True) if w.poll() is None]
    if not expiring_progress_ok:
        assert_nothing_leaked(client, ports, timeout=timeout)
        return
    end = time.monotonic() + timeout
    while True:
        left = leaks(client)
        expiring = [p for p in left if _expiring_progress(client, p)]
        problems = [p for p in left if p not in expiring]
        problems += [f"{n:.0f} engine requests running" for p in ports if (n := running_requests(p))]
        if not problems or time.monotonic() > end:
            break
        time.sleep(0.1)
    assert not problems, problems
    if expiring:
        print(f"left to expire by themselves: {expiring}")


# Deadlines in fault tests are at most this long; a progress record lives a minute past it.
_LONGEST_DEADLINE_SECONDS = 60.0


def _expiring_progress(client: redis.Redis, problem: str) -> bool:
    name = problem.removeprefix("stray key ")
    if name == problem or not name.startswith(f"{keys.PREFIX}:progress:"):
        return False
    ttl = client.pttl(name)
    return bool(0 < ttl <= (_LONGEST_DEADLINE_SECONDS + 60) * 1000)
