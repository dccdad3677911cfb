"""What GATEWAY_SUBMIT_REPLICAS costs a submit: the gateway's real submit, with and without WAIT.

A primary and one replica (redis-server --replicaof) on loopback. The same JobQueue.submit is
timed, one at a time and then C at once, waiting for 0 replicas and for 1, in alternating
rounds of one run (a shared machine is noisy). Medians over the rounds.

    .venv/bin/python -m bench.submit_wait [--submits 500] [--concurrency 64] [--rounds 3]
"""

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import redis

from common.redis_client import connect
from devstack.redis_server import RedisServer
from gateway.queue import JobQueue
from tests.unit.queue_helpers import deadline, valid_request


async def one_round(url: str, replicas: int, submits: int, concurrency: int) -> tuple[float, float]:
    """(median ms per sequential submit, submits per second with `concurrency` at once)."""
    client = connect(url, socket_timeout=5)
    queue = JobQueue(client, client, f"bench-{replicas}", 1 << 30, submit_replicas=replicas)
    await queue.start()
    try:
        request = valid_request()
        latencies = []
        for _ in range(submits):
            start = time.perf_counter()
            queue.release(await queue.submit(request, deadline()))
            latencies.append(time.perf_counter() - start)

        async def submitter(n: int) -> None:
            for _ in range(n):
                queue.release(await queue.submit(request, deadline()))

        start = time.perf_counter()
        await asyncio.gather(*(submitter(submits // concurrency) for _ in range(concurrency)))
        rate = (submits // concurrency) * concurrency / (time.perf_counter() - start)
        return statistics.median(latencies) * 1000, rate
    finally:
        await queue.stop()
        await client.aclose()


def main(submits: int, concurrency: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as data:
        primary = RedisServer(Path(data) / "primary")
        primary.data_dir.mkdir()
        primary.start()
        replica = RedisServer(Path(data) / "replica", args=("--replicaof", "127.0.0.1", str(primary.port)))
        replica.data_dir.mkdir()
        replica.start()
        try:
            with redis.Redis(port=replica.port) as sync:
                while sync.info("replication").get("master_link_status") != "up":
                    time.sleep(0.05)
            results: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
            for _ in range(rounds):
                for replicas in (0, 1):
                    measured = asyncio.run(one_round(primary.url, replicas, submits, concurrency))
                    results[replicas].append(measured)
        finally:
            replica.stop()
            primary.stop()
    print(f"{submits} submits per round, {concurrency} at once for the rate, {rounds} rounds, medians:")
    print("GATEWAY_SUBMIT_REPLICAS   ms per submit (one at a time)   submits/s (concurrent)")
    for replicas, rows in results.items():
        latency = statistics.median(r[0] for r in rows)
        rate = statistics.median(r[1] for r in rows)
        print(f"{replicas:23d}   {latency:29.3f}   {rate:22.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submits", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    main(args.submits, args.concurrency, args.rounds)
