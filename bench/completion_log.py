"""What resumable streams cost Redis: the publish script with and without completion logs.

Every job event is written to the gateway's reply stream and, since resumable streams, to the
job's completion log too (worker/publisher.py). This drives the real EventPublisher against
a real redis-server with many jobs streaming one token per event, in alternating rounds:
  with     each job has its completion log (as every job queued by a gateway now has)
  without  no log exists (the script's XADD NOMKSTREAM finds none: the cost before them)
and reports Redis' CPU seconds per 1,000 events (INFO's used_cpu_user + used_cpu_sys), the
publisher's events per second, and the logs' memory per event. Medians over the rounds;
the two variants run side by side in one run, so a noisy machine affects both alike.

    .venv/bin/python -m bench.completion_log [--jobs 200] [--events 50] [--rounds 5]
"""

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from redis.asyncio import Redis

from common import codec, keys
from devstack.redis_server import RedisServer
from worker.publisher import EventPublisher, Progress

REPLY_STREAM = "chat:replies:bench"


async def redis_cpu(client: Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def one_round(client: Redis, jobs: int, events: int, with_logs: bool) -> tuple[float, float, float]:
    """(Redis CPU s per 1,000 events, events per second, log bytes per event) of one round."""
    await client.delete(REPLY_STREAM)
    await client.xadd(REPLY_STREAM, {"created": "1"})
    ids = [uuid.uuid4().hex for _ in range(jobs)]
    if with_logs:
        for request_id in ids:
            await client.xadd(keys.completion_log(request_id), {"call": "{}"})
    publisher = EventPublisher(client)
    publisher.start()
    cpu, start = await redis_cpu(client), time.perf_counter()
    for seq in range(events):
        for request_id in ids:
            event = codec.Event(request_id=request_id, seq=seq, attempt=1)
            if seq == 0:
                event.started.system_fingerprint = "fp"
            else:
                event.delta.text, event.delta.completion_tokens = " tok", seq
            publisher.publish(REPLY_STREAM, event, Progress(1, seq, 4 * seq, (seq,), fresh=seq == 0))
        await publisher.flush()  # one engine step: one token for every job, then the next
    elapsed, used = time.perf_counter() - start, await redis_cpu(client) - cpu
    await publisher.stop()
    total = jobs * events
    memory = 0
    if with_logs:
        memory = sum([await client.memory_usage(keys.completion_log(i)) or 0 for i in ids])
    await client.delete(*[keys.completion_log(i) for i in ids], *[keys.progress(i) for i in ids])
    return used / total * 1000, total / elapsed, memory / total


async def main(jobs: int, events: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as data:
        server = RedisServer(Path(data))
        server.start()
        client = Redis.from_url(server.url)
        try:
            results: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
            for _ in range(rounds):
                for with_logs in (False, True):
                    results[with_logs].append(await one_round(client, jobs, events, with_logs))
        finally:
            await client.aclose()
            server.stop()
    print(f"{jobs} jobs x {events} events per round, {rounds} rounds, medians:")
    print("variant   redis_cpu_ms_per_1k_events   events_per_s   log_bytes_per_event")
    for with_logs in (False, True):
        cpu, rate, memory = (statistics.median(r[i] for r in results[with_logs]) for i in range(3))
        print(f"{'with' if with_logs else 'without':8}  {cpu * 1000:26.1f}   {rate:12.0f}   {memory:19.0f}")
    ratio = statistics.median(r[0] for r in results[True]) / statistics.median(r[0] for r in results[False])
    print(f"Redis CPU with/without: {ratio:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.jobs, args.events, args.rounds))
