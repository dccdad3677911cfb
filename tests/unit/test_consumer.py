"""How the consumer takes jobs and starts them (worker/consumer.py), on a real redis-server.

An abort is never lost between a job's delivery and its start in the engine: the consumer
checks Redis before it starts a job (cancel flag, progress record), and an abort that
arrives during those awaits (the job was reclaimed, the worker drains) must keep the job
out of the engine. And an idle worker lingers for the rest of a burst. The engine is the
scripted fake of test_runner."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from common import codec, keys
from devstack.redis_server import RedisServer
from tests.unit.test_runner import CollectingFakePublisher, ScriptedFakeEngine
from worker.config import WorkerSettings
from worker.consumer import JobConsumer, _Running
from worker.engine.base import Delta
from worker.jobs import Delivery


class RedisWithHeldExists(Redis):
    """Holds each EXISTS until released, so an abort can land while the consumer waits on it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waiting = asyncio.Event()
        self.release = asyncio.Event()

    async def exists(self, *names: Any) -> Any:  # type: ignore[override]
        self.waiting.set()
        await self.release.wait()
        return await super().exists(*names)


class FlushingFakePublisher(CollectingFakePublisher):
    async def flush(self, reply_to: str | None = None) -> None: ...


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[RedisWithHeldExists]:
    client = RedisWithHeldExists.from_url(redis_server.url)
    yield client  # type: ignore[misc]
    await client.aclose()


def delivery(request_id: str) -> Delivery:
    job = codec.Job(request_id=request_id, model="m", prompt_token_ids=[1, 2], reply_to="reply")
    job.sampling.max_tokens = 5
    return Delivery(b"1-1", request_id, "reply", 1, job)


@pytest.mark.parametrize("reason", ["reclaimed", "drain", "cancelled"])
async def test_a_job_aborted_while_the_consumer_waits_on_redis_never_reaches_the_engine(
    client: RedisWithHeldExists, reason: str
) -> None:
    engine = ScriptedFakeEngine([Delta("a", 1, finish_reason="stop")])
    publisher = FlushingFakePublisher()
    settings = WorkerSettings.from_env({"WORKER_ENGINE": "bench", "WORKER_ID": "w1"})
    consumer = JobConsumer(settings, client, engine, publisher)  # type: ignore[arg-type]
    request_id = uuid.uuid4().hex
    consumer._accept(delivery(request_id))
    running = consumer._running[request_id]
    await client.waiting.wait()  # the consumer is checking the cancel flag
    if reason != "cancelled":  # as the heartbeat and drain() do: this worker says nothing more
        running.handed_back = running.events.silenced = True
    await consumer._abort(running, reason)
    client.release.set()
    assert running.task is not None
    await running.task
    assert engine.requests == [], "an aborted job was started in the engine"
    outcomes = [e.WhichOneof("kind") for e in publisher.events]
    assert outcomes == ([] if reason != "cancelled" else ["failed"])


@pytest.mark.parametrize(("linger_ms", "taken"), [("0", 1), ("200", 3)])
async def test_an_idle_worker_lingers_for_the_rest_of_a_burst(
    redis_server: RedisServer, linger_ms: str, taken: int
) -> None:
    # A burst reaches Redis over a few ms; the first job wakes the blocked read alone.
    client = Redis.from_url(redis_server.url)
    settings = WorkerSettings.from_env(
        {"WORKER_ENGINE": "bench", "WORKER_ID": "w1", "WORKER_MODEL": f"m{uuid.uuid4().hex[:6]}=/nowhere",
         "WORKER_IDLE_LINGER_MS": linger_ms}
    )  # fmt: skip
    consumer = JobConsumer(settings, client, ScriptedFakeEngine([]), FlushingFakePublisher())  # type: ignore[arg-type]
    await consumer._jobs.ensure_groups()
    consumer._next_reclaim = float("inf")  # only new jobs here
    reading = asyncio.create_task(consumer._take(free=4))
    await asyncio.sleep(0.05)  # the read is blocked in Redis
    for n in range(3):
        await client.xadd(consumer._jobs.shards[0].stream, {keys.REQUEST_ID_FIELD: f"r{n}".encode()})
        await asyncio.sleep(0.005)
    assert len(await reading) == taken
    await client.aclose()


async def test_a_heartbeat_that_fails_unexpectedly_is_restarted(redis_server: RedisServer) -> None:
    # A dead heartbeat would let other workers take over every job this worker runs.
    client = Redis.from_url(redis_server.url)
    settings = WorkerSettings.from_env(
        {"WORKER_ENGINE": "bench", "WORKER_ID": "w1", "WORKER_MODEL": f"m{uuid.uuid4().hex[:6]}=/nowhere",
         "WORKER_HEARTBEAT_SECONDS": "0.1", "WORKER_CLAIM_IDLE_SECONDS": "0.2"}
    )  # fmt: skip
    consumer = JobConsumer(settings, client, ScriptedFakeEngine([]), FlushingFakePublisher())  # type: ignore[arg-type]
    beats: list[float] = []

    async def heartbeat(deliveries: list[Delivery]) -> set[tuple[str, bytes]]:
        beats.append(asyncio.get_running_loop().time())
        if len(beats) == 1:
            raise RuntimeError("a bug in the heartbeat")
        return set()

    consumer._jobs.heartbeat = heartbeat  # type: ignore[method-assign]
    running = asyncio.create_task(consumer.run())
    await asyncio.sleep(1.6)  # the first beat fails; the loop is restarted a second later
    consumer.stop()
    await running
    assert len(beats) >= 3
    await client.aclose()


async def test_a_job_of_n_choices_takes_n_of_the_workers_sequences(client: RedisWithHeldExists) -> None:
    settings = WorkerSettings.from_env(
        {"WORKER_ENGINE": "bench", "WORKER_ID": "w1", "WORKER_MAX_CONCURRENCY": "8"}
    )
    engine = ScriptedFakeEngine([Delta("a", 1, finish_reason="stop")])
    consumer = JobConsumer(settings, client, engine, FlushingFakePublisher())  # type: ignore[arg-type]
    three = delivery(uuid.uuid4().hex)
    assert three.job is not None
    three.job.sampling.n, three.job.sampling.temperature = 3, 1.0  # sampled: three sequences
    consumer._accept(three)
    consumer._accept(delivery(uuid.uuid4().hex))
    assert (consumer.num_running, consumer.free_sequences) == (2, 8 - 3 - 1)
    tasks = [r.task for r in consumer._running.values() if r.task is not None]
    client.release.set()  # the jobs run (the fake engine ends them at once) and give their sequences back
    await asyncio.gather(*tasks)
    assert (consumer.num_running, consumer.free_sequences) == (0, 8)


async def test_reads_take_as_many_jobs_as_surely_fit_and_greedy_choices_take_one_sequence(
    client: RedisWithHeldExists,
) -> None:
    settings = WorkerSettings.from_env(
        {"WORKER_ENGINE": "bench", "WORKER_ID": "w1", "WORKER_MAX_CONCURRENCY": "8"}
    )
    consumer = JobConsumer(settings, client, ScriptedFakeEngine([]), FlushingFakePublisher())  # type: ignore[arg-type]
    assert consumer.jobs_to_read() == 8  # nothing wider than one sequence seen yet
    greedy = delivery("g")
    assert greedy.job is not None
    greedy.job.sampling.n, greedy.job.sampling.temperature = 3, 0.0
    consumer._running["g"] = _Running(greedy, None)  # type: ignore[arg-type]
    assert consumer.free_sequences == 7  # the engine generates greedy choices once
    sampled = delivery("s")
    assert sampled.job is not None
    sampled.job.sampling.n, sampled.job.sampling.temperature = 4, 1.0
    consumer._running["s"] = _Running(sampled, None)  # type: ignore[arg-type]
    consumer._widest_job = 4
    assert (consumer.free_sequences, consumer.jobs_to_read()) == (3, 1)  # at least one
    consumer._running["s2"] = _Running(sampled, None)  # type: ignore[arg-type]
    assert (consumer.free_sequences, consumer.jobs_to_read()) == (0, 0)  # over: never below 0


def test_flex_jobs_leave_the_reserve_free_for_on_demand_ones(client: RedisWithHeldExists) -> None:
    def consumer_of(concurrency: int, reserve: str | None = None) -> JobConsumer:
        env = {"WORKER_ENGINE": "bench", "WORKER_ID": "w1", "WORKER_MAX_CONCURRENCY": str(concurrency)}
        settings = WorkerSettings.from_env({**env, **({"WORKER_FLEX_RESERVE": reserve} if reserve else {})})
        return JobConsumer(settings, client, ScriptedFakeEngine([]), FlushingFakePublisher())  # type: ignore[arg-type]

    consumer = consumer_of(4)  # WORKER_FLEX_RESERVE 1 by default
    assert (consumer.jobs_to_read(), consumer.flex_jobs_to_read(4)) == (4, 3)
    for k in range(3):
        consumer._running[f"j{k}"] = _Running(delivery(f"j{k}"), None)  # type: ignore[arg-type]
    assert (consumer.jobs_to_read(), consumer.flex_jobs_to_read(1)) == (1, 0)  # the last one: on_demand's
    assert consumer_of(1).flex_jobs_to_read(1) == 1  # capped: a worker of one sequence serves flex too
    assert consumer_of(4, reserve="0").flex_jobs_to_read(4) == 4
