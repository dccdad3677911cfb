"""An abort is never lost between a job's delivery and its start in the engine (worker/consumer.py).

The consumer checks Redis before it starts a job (cancel flag, progress record); an abort
that arrives during those awaits (the job was reclaimed, the worker drains) must keep the
job out of the engine. Real redis-server; the engine is the scripted fake of test_runner.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from common import codec
from devstack.redis_server import RedisServer
from tests.unit.test_runner import CollectingFakePublisher, ScriptedFakeEngine
from worker.config import WorkerSettings
from worker.consumer import JobConsumer
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
    async def flush(self) -> None: ...


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
