"""Workers advertise their engine's context window; gateways take the smallest live one.

Against a real redis-server (common/engine_registry.py, gateway/catalog.py).
"""

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from common import engine_registry, keys
from common.model_store import DEFAULT_MODEL_NAME
from common.models import ModelSpec
from devstack.redis_server import RedisServer
from gateway.catalog import ModelCatalog

MODEL = "m-registry"


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    await client.delete(keys.engines(MODEL))
    yield client
    await client.delete(keys.engines(MODEL))
    await client.aclose()


async def window(redis: Redis) -> int | None:
    live = await engine_registry.live_engines(redis, MODEL)
    return live.context_window if live is not None else None


async def test_no_live_worker_means_no_window(redis: Redis) -> None:
    assert await window(redis) is None


async def test_the_smallest_live_window_wins_and_withdrawn_workers_drop_out(redis: Redis) -> None:
    await engine_registry.advertise(redis, MODEL, "w1", 8192, ttl=10)
    await engine_registry.advertise(redis, MODEL, "w2", 2048, ttl=10)
    assert await window(redis) == 2048
    await engine_registry.withdraw(redis, MODEL, "w2")
    assert await window(redis) == 8192


async def test_entries_of_workers_that_stopped_refreshing_expire_and_are_removed(redis: Redis) -> None:
    await engine_registry.advertise(redis, MODEL, "dead", 512, ttl=0.05)
    await engine_registry.advertise(redis, MODEL, "alive", 4096, ttl=10)
    await asyncio.sleep(0.1)
    assert await window(redis) == 4096
    assert await redis.hkeys(keys.engines(MODEL)) == [b"alive"]


async def test_an_unreadable_entry_counts_as_expired(redis: Redis) -> None:
    await redis.hset(keys.engines(MODEL), "garbage", b"\xff not json")
    assert await window(redis) is None
    assert not await redis.exists(keys.engines(MODEL))


def test_the_catalog_follows_the_engines_and_falls_back_to_the_model() -> None:
    catalog = ModelCatalog.load((ModelSpec.parse(DEFAULT_MODEL_NAME),))
    model = catalog.get(DEFAULT_MODEL_NAME)
    assert model is not None and model.context_window == 8192  # SmolLM2's config.json
    catalog.set_engine_context_window(DEFAULT_MODEL_NAME, 1024)
    assert catalog.get(DEFAULT_MODEL_NAME).context_window == 1024  # type: ignore[union-attr]
    catalog.set_engine_context_window(DEFAULT_MODEL_NAME, None)
    assert catalog.get(DEFAULT_MODEL_NAME).context_window == 8192  # type: ignore[union-attr]


async def test_gateways_learn_the_fewest_job_streams_a_live_worker_reads(redis: Redis) -> None:
    await engine_registry.advertise(redis, MODEL, "w1", 8192, ttl=10, job_streams=4)
    await engine_registry.advertise(redis, MODEL, "w2", 8192, ttl=10, job_streams=2)
    assert await engine_registry.live_engines(redis, MODEL) == engine_registry.LiveEngines(8192, 2)
    await redis.hset(keys.engines(MODEL), "older", '{"context_window": 8192, "expires_ms": 1e15}')
    live = await engine_registry.live_engines(redis, MODEL)
    assert live is not None and live.job_streams == 1  # an entry that does not say: one stream
