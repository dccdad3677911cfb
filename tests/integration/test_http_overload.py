"""503 (queue full, Redis down), 498 (flex lane full), 504 (deadline) and readiness over HTTP.

A gateway of its own with no worker, on its own redis-server: jobs stay queued.
"""

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import groq
import openai
import pytest
import redis

from common import codec, keys
from devstack.redis_server import RedisServer
from tests.integration.stack import MODEL, Stack, scrape

HI = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def idle_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    redis_server = RedisServer(Path(tmp_path_factory.mktemp("idle-redis")))
    redis_server.start()
    stack = Stack(
        redis_server,
        Path(tmp_path_factory.mktemp("idle-logs")),
        gateway_env={
            "GATEWAY_MAX_QUEUED_JOBS": "1",
            "GATEWAY_DEFAULT_TIMEOUT_SECONDS": "1.5",
            "GATEWAY_RETRY_AFTER_SECONDS": "2",
            "GATEWAY_FLEX_MAX_QUEUED_JOBS": "1",
        },
    )
    stack.start_gateway()
    try:
        yield stack
    finally:
        stack.stop()
        redis_server.stop()


def ready(stack: Stack) -> int:
    try:
        with urllib.request.urlopen(f"{stack.http_url}/readyz", timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        assert json.loads(exc.read())["status"] == "not ready"
        return exc.code


async def test_queue_full_is_503_with_retry_after_and_the_deadline_504(idle_stack: Stack) -> None:
    async with openai.AsyncOpenAI(base_url=f"{idle_stack.http_url}/v1", api_key="x", max_retries=0) as client:
        queued = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=HI))  # type: ignore[arg-type]
        await asyncio.sleep(0.3)  # the first job is queued; no worker takes it
        with pytest.raises(openai.InternalServerError) as full:
            await client.chat.completions.with_raw_response.create(model=MODEL, messages=HI)  # type: ignore[arg-type]
        assert full.value.status_code == 503 and full.value.code == "service_overloaded"
        headers = full.value.response.headers
        assert headers["retry-after"] == "2" and headers["x-should-retry"] == "true"
        # Where it would have stood in line; no estimate of the wait without a live worker.
        assert headers["x-queue-position"] == "2" and "x-estimated-wait-seconds" not in headers
        assert "would be #2 in line" in full.value.message
        start = time.monotonic()
        with pytest.raises(openai.InternalServerError) as late:
            await queued
        assert late.value.status_code == 504 and late.value.code == "timeout"
        assert late.value.response.headers["x-should-retry"] == "false"
        assert time.monotonic() - start < 2.5


async def test_a_full_flex_lane_is_498_capacity_exceeded_at_once(idle_stack: Stack) -> None:
    async with groq.AsyncGroq(base_url=idle_stack.http_url, api_key="x", max_retries=0) as client:
        flex: Any = {"model": MODEL, "messages": HI, "service_tier": "flex"}
        queued = asyncio.create_task(client.chat.completions.create(**flex))
        await asyncio.sleep(0.3)  # the first flex job is queued; no worker takes it
        start = time.monotonic()
        with pytest.raises(groq.APIStatusError) as full:
            await client.chat.completions.create(**flex)
        refused_in = time.monotonic() - start
        assert full.value.status_code == 498 and refused_in < 1.0, refused_in
        assert isinstance(full.value.body, dict)
        error = full.value.body["error"]  # the groq SDK keeps the whole body for a status it does not type
        assert error["code"] == "capacity_exceeded" and "flex capacity" in error["message"], error
        headers = full.value.response.headers
        assert headers["retry-after"] == "2" and headers["x-should-retry"] == "true"
        assert headers["x-queue-position"] == "2"
        with pytest.raises(groq.APIStatusError) as late:
            await queued  # waited in its lane until the deadline, as any job
        assert late.value.status_code == 504
    refusals = scrape(idle_stack.gateway_metrics_port)
    assert refusals[f'chat_gateway_rejections_total{{model="{MODEL}",reason="flex_capacity_exceeded"}}'] == 1


async def test_readiness_follows_redis(idle_stack: Stack) -> None:
    assert ready(idle_stack) == 200
    idle_stack.redis_server.stop()
    try:
        deadline = time.monotonic() + 5
        while ready(idle_stack) != 503:
            assert time.monotonic() < deadline, "/readyz still 200 with Redis down"
            await asyncio.sleep(0.1)
        async with openai.AsyncOpenAI(
            base_url=f"{idle_stack.http_url}/v1", api_key="x", max_retries=0
        ) as client:
            with pytest.raises(openai.InternalServerError) as caught:
                await client.chat.completions.create(model=MODEL, messages=HI)  # type: ignore[arg-type]
        assert caught.value.status_code == 503 and caught.value.code == "service_unavailable"
    finally:
        idle_stack.redis_server.start()
    deadline = time.monotonic() + 10
    while ready(idle_stack) != 200:
        assert time.monotonic() < deadline, "/readyz not back after Redis restarted"
        await asyncio.sleep(0.1)


async def test_a_json_schema_reaches_the_job_as_text_with_json_mode(idle_stack: Stack) -> None:
    client = redis.Redis.from_url(idle_stack.redis_server.url)
    stream = keys.job_stream(MODEL)
    client.delete(stream)  # no worker here: start from an empty queue
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    async with openai.AsyncOpenAI(base_url=f"{idle_stack.http_url}/v1", api_key="x", max_retries=0) as api:
        call = asyncio.create_task(
            api.chat.completions.create(model=MODEL, messages=HI, response_format=response_format)  # type: ignore[arg-type]
        )
        deadline = time.monotonic() + 5
        while not client.xlen(stream):
            assert time.monotonic() < deadline, "the job was not queued"
            await asyncio.sleep(0.05)
        [(_, fields)] = client.xrange(stream)
        job = codec.decode_job(fields[keys.PAYLOAD_FIELD])
        assert json.loads(job.sampling.json_schema) == schema and job.sampling.json_mode
        with pytest.raises(openai.InternalServerError):  # nobody runs it: the deadline passes
            await call
    client.close()
