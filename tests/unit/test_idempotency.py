"""Idempotency keys (gateway/idempotency.py) against a real redis-server: claim, attach, conflict, give up."""

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from common import keys
from common.redis_client import connect
from devstack.redis_server import RedisServer
from gateway.errors import IdempotencyConflict, InvalidField
from gateway.idempotency import Attach, Claim, IdempotencyKeys, idempotency_key

GATEWAY = "idempotency-test"  # its reply stream is made by the `alive` fixture
JOB = "0123456789abcdef0123456789abcdef"


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = connect(redis_server.url, socket_timeout=5)
    yield client
    await client.aclose()


@pytest.fixture(autouse=True)
async def alive(client: Redis) -> AsyncIterator[None]:
    """The reply stream of GATEWAY: its calls are alive while it exists."""
    await client.xadd(keys.reply_stream(GATEWAY), {"created": "1"})
    yield
    await client.delete(keys.reply_stream(GATEWAY))


@pytest.fixture
def key() -> str:
    return f"k-{uuid.uuid4()}"


async def test_the_first_call_claims_and_a_retry_attaches_to_its_job(client: Redis, key: str) -> None:
    store = IdempotencyKeys(client, 600, GATEWAY)
    claim = await store.claim_or_wait(key, "scope", b"request", running_seconds=30)
    assert isinstance(claim, Claim)
    assert 0 < await client.pttl(claim.record) <= 35_000  # running: held for the call's deadline only
    await store.bind(claim, JOB)
    assert await store.claim_or_wait(key, "scope", b"request", running_seconds=30) == Attach(JOB)
    assert await store.keep(claim, JOB)
    assert await store.claim_or_wait(key, "scope", b"request", running_seconds=30) == Attach(JOB)
    assert 590_000 < await client.pttl(claim.record) <= 600_000  # finished: kept for the window
    await store.give_up(claim)  # too late: a finished call's key stays
    assert await client.exists(claim.record)


async def test_a_retry_waits_until_the_first_call_has_queued_its_job(client: Redis, key: str) -> None:
    store = IdempotencyKeys(client, 600, GATEWAY)
    claim = await store.claim_or_wait(key, "scope", b"request", running_seconds=30)
    assert isinstance(claim, Claim)
    retry = asyncio.create_task(store.claim_or_wait(key, "scope", b"request", running_seconds=30))
    await asyncio.sleep(0.3)
    assert not retry.done()
    await store.bind(claim, JOB)
    assert await asyncio.wait_for(retry, 1) == Attach(JOB)


async def test_a_key_given_up_is_claimed_by_the_waiting_retry(client: Redis, key: str) -> None:
    store = IdempotencyKeys(client, 600, GATEWAY)
    first = await store.claim_or_wait(key, "scope", b"request", running_seconds=30)
    assert isinstance(first, Claim)
    retry = asyncio.create_task(store.claim_or_wait(key, "scope", b"request", running_seconds=30))
    await asyncio.sleep(0.2)
    await store.give_up(first)  # the first call ended without an answer
    second = await asyncio.wait_for(retry, 1)
    assert isinstance(second, Claim) and second.owner != first.owner
    await store.give_up(first)  # too late: the key is the retry's now
    assert await client.hget(second.record, "owner") == second.owner.encode()


async def test_a_key_held_by_a_gateway_that_died_is_freed_for_the_retry(client: Redis, key: str) -> None:
    dead = IdempotencyKeys(client, 600, "gone-gateway")  # no reply stream: it stopped refreshing it
    first = await dead.claim_or_wait(key, "scope", b"request", running_seconds=300)
    assert isinstance(first, Claim)
    store = IdempotencyKeys(client, 600, GATEWAY)
    retry = await asyncio.wait_for(store.claim_or_wait(key, "scope", b"request", running_seconds=30), 1)
    assert isinstance(retry, Claim) and retry.owner != first.owner


async def test_another_request_under_the_key_is_refused_naming_it(client: Redis, key: str) -> None:
    store = IdempotencyKeys(client, 600, GATEWAY)
    assert isinstance(await store.claim_or_wait(key, "scope", b"request", running_seconds=30), Claim)
    with pytest.raises(IdempotencyConflict) as caught:
        await store.claim_or_wait(key, "scope", b"another request", running_seconds=30)
    assert key in caught.value.message
    # Another API key's calls never meet this one's keys.
    assert isinstance(await store.claim_or_wait(key, "other", b"another request", running_seconds=30), Claim)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [((), None), ((("idempotency-key", ""),), None), ((("idempotency-key", b"abc"),), "abc")],
)
def test_the_key_is_read_from_metadata(
    metadata: tuple[tuple[str, str | bytes], ...], expected: str | None
) -> None:
    assert idempotency_key(metadata) == expected


@pytest.mark.parametrize("bad", ["x" * 256, "caf\u00e9", "a\nb"])
def test_a_malformed_key_is_refused(bad: str) -> None:
    with pytest.raises(InvalidField) as caught:
        idempotency_key((("idempotency-key", bad),))
    assert caught.value.field == "idempotency-key"


async def test_a_bound_key_of_a_gateway_that_died_is_freed_for_the_retry(client: Redis, key: str) -> None:
    # Its job is dropped by the workers (reply stream gone): the retry must run anew, not attach
    # to a job that ends failed.
    dead = IdempotencyKeys(client, 600, "gone-gateway")
    first = await dead.claim_or_wait(key, "scope", b"request", running_seconds=300)
    assert isinstance(first, Claim)
    await dead.bind(first, JOB)
    store = IdempotencyKeys(client, 600, GATEWAY)
    retry = await asyncio.wait_for(store.claim_or_wait(key, "scope", b"request", running_seconds=30), 1)
    assert isinstance(retry, Claim) and retry.owner != first.owner


async def test_a_finished_call_whose_bind_was_lost_still_points_retries_at_its_job(
    client: Redis, key: str
) -> None:
    store = IdempotencyKeys(client, 600, GATEWAY)
    claim = await store.claim_or_wait(key, "scope", b"request", running_seconds=30)
    assert isinstance(claim, Claim)
    assert await store.keep(claim, JOB)  # no bind before it
    assert await store.claim_or_wait(key, "scope", b"request", running_seconds=30) == Attach(JOB)
