"""What a call costs its API key: the tokens really generated, once, whatever ends the call.

Two gateways share one redis-server and one benchmark-engine worker that runs one job at a
time at 20 tokens per second, so a call can be cut after a known number of tokens and a job
can be held in the queue behind another. Every figure is read from the key's rate-limit
window in Redis, which is what the limiter enforces.
"""

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import redis

from chat.v1 import chat_pb2, chat_pb2_grpc
from common import keys
from devstack.redis_server import RedisServer
from gateway import apikeys
from tests.integration.stack import MODEL, Stack, chat_request, jobs_ever_queued
from tests.security.conftest import assert_only_accounting_left, new_key

TOKENS_PER_SECOND = 20
PROMPT = "Count for me."


@pytest.fixture(scope="module")
def gateways(secure_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Stack]]:
    """Two gateways (auth on, one waiting job per model at most) and one worker behind both."""
    log_dir = Path(tmp_path_factory.mktemp("charges-logs"))
    # No resume grace: a stream whose caller leaves has its job cancelled at once, so a cut is
    # charged what was generated up to it (tests/security/test_resume_access.py charges resumes).
    env = {
        "GATEWAY_AUTH": "on",
        "GATEWAY_AUTH_CACHE_SECONDS": "0",
        "GATEWAY_MAX_QUEUED_JOBS": "1",
        "GATEWAY_RESUME_GRACE_SECONDS": "0",
    }
    worker_env = {
        "WORKER_ENGINE": "bench",
        "WORKER_BENCH_TOKENS_PER_SECOND": str(TOKENS_PER_SECOND),
        "WORKER_MAX_CONCURRENCY": "1",
        "WORKER_CANCEL_POLL_SECONDS": "0.05",
    }
    first = Stack(secure_redis, log_dir / "a", gateway_env=env, worker_env=worker_env)
    second = Stack(secure_redis, log_dir / "b", gateway_env=env)
    for stack in (first, second):
        stack.log_dir.mkdir()
    try:
        first.start_gateway()
        second.start_gateway()
        first.start_worker()
        yield [first, second]
    finally:
        first.stop()
        second.stop()


@pytest.fixture(autouse=True)
def nothing_leaked(gateways: list[Stack], redis_admin: redis.Redis) -> Iterator[None]:
    """Each test ends with no job, cancel flag, progress record or unfinished idempotency key left."""
    yield
    assert_only_accounting_left(redis_admin)


def used(client: redis.Redis, key: str) -> tuple[int, int]:
    """(requests, tokens) the key has used, over every window it has."""
    digest = apikeys.digest(key)
    requests = tokens = 0
    for window in client.scan_iter(f"{keys.PREFIX}:ratelimit:{{{digest}}}:*"):
        fields = client.hgetall(window)
        requests += int(fields.get(b"requests", 0))
        tokens += int(fields.get(b"tokens", 0))
    return requests, tokens


def settled(client: redis.Redis, key: str, below: int, timeout: float = 5.0) -> tuple[int, int]:
    """The key's usage once its tokens dropped below `below` (a call's settlement is asynchronous)."""
    end = time.monotonic() + timeout
    while (usage := used(client, key))[1] >= below and time.monotonic() < end:
        time.sleep(0.05)
    return usage


def metadata(key: str, idempotency_key: str | None = None) -> tuple[tuple[str, str], ...]:
    auth = (("authorization", f"Bearer {key}"),)
    return auth + ((("idempotency-key", idempotency_key),) if idempotency_key else ())


def unary(stack: Stack, key: str, timeout: float = 20, **fields: object) -> chat_pb2.ChatCompletionResponse:
    with grpc.insecure_channel(stack.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        request = chat_request(PROMPT, **fields)
        reply: chat_pb2.ChatCompletionResponse = stub.ChatCompletion(
            request, metadata=metadata(key), timeout=timeout
        )
        return reply


@pytest.fixture(scope="module")
def prompt_tokens(gateways: list[Stack], secure_redis: RedisServer) -> int:
    return unary(gateways[0], new_key(secure_redis, "measure"), max_tokens=1).usage.prompt_tokens


def cut_stream(stack: Stack, key: str, after_chunks: int, max_tokens: int) -> int:
    """Streams a call and cancels it after `after_chunks` chunks of text; returns the tokens received."""
    with grpc.insecure_channel(stack.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        call = stub.StreamChatCompletion(
            chat_request(PROMPT, max_tokens=max_tokens), metadata=metadata(key), timeout=30
        )
        text = []
        for chunk in call:
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
            if len(text) == after_chunks:
                call.cancel()
                break
        return "".join(text).count("t")  # the bench engine's tokens read "t1 t2 t3 "


class Occupied:
    """Holds the only worker busy with a long stream until left."""

    def __init__(self, stack: Stack, key: str) -> None:
        self._channel = grpc.insecure_channel(stack.address)
        stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self._call = stub.StreamChatCompletion(
            chat_request(PROMPT, max_tokens=600), metadata=metadata(key), timeout=60
        )
        next(iter(self._call))  # the worker took it

    def __enter__(self) -> "Occupied":
        return self

    def __exit__(self, *exc: object) -> None:
        self._call.cancel()
        self._channel.close()
        time.sleep(0.3)  # the worker sees the cancel within its poll interval


def wait_worker_idle(client: redis.Redis) -> None:
    """Until the one worker holds no job (an earlier test's cancelled job may still be ending)."""
    end = time.monotonic() + 10
    while client.xlen(keys.job_stream(MODEL)):
        assert time.monotonic() < end, "the worker still holds a job"
        time.sleep(0.02)


def test_a_stream_cut_after_three_chunks_is_charged_the_tokens_generated(
    gateways: list[Stack],
    secure_redis: RedisServer,
    redis_admin: redis.Redis,
    prompt_tokens: int,
    fresh_minute: None,
) -> None:
    key = new_key(secure_redis, "cut-stream", rpm=100, tpm=100_000)
    received = cut_stream(gateways[0], key, after_chunks=3, max_tokens=600)
    requests, tokens = settled(redis_admin, key, below=prompt_tokens + 600)
    generated = tokens - prompt_tokens
    print(
        f"stream cut after {received} tokens received: charged {tokens}"
        f" = prompt {prompt_tokens} + {generated}"
    )
    assert requests == 1
    # The worker may generate a token or two more before it sees the cancel (it polls every 50 ms).
    assert received <= generated <= received + 3


def test_a_call_past_its_deadline_is_charged_the_tokens_generated(
    gateways: list[Stack],
    secure_redis: RedisServer,
    redis_admin: redis.Redis,
    prompt_tokens: int,
    fresh_minute: None,
) -> None:
    key = new_key(secure_redis, "deadline", rpm=100, tpm=100_000)
    wait_worker_idle(redis_admin)  # so that the job starts at once and runs into its deadline
    with pytest.raises(grpc.RpcError) as caught:
        unary(gateways[1], key, timeout=1.0, max_tokens=600)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    requests, tokens = settled(redis_admin, key, below=prompt_tokens + 600)
    generated = tokens - prompt_tokens
    print(f"unary call past its 1 s deadline: charged {tokens} = prompt {prompt_tokens} + {generated}")
    assert requests == 1 and 1 <= generated <= TOKENS_PER_SECOND + 3


def test_calls_that_never_reached_a_worker_give_back_request_and_tokens(
    gateways: list[Stack], secure_redis: RedisServer, redis_admin: redis.Redis, fresh_minute: None
) -> None:
    waited, refused = (new_key(secure_redis, name, rpm=100, tpm=100_000) for name in ("waited", "refused"))
    errors: list[grpc.RpcError] = []

    def wait_in_queue() -> None:
        try:
            unary(gateways[0], waited, timeout=2.0, max_tokens=10)
        except grpc.RpcError as exc:
            errors.append(exc)

    with Occupied(gateways[0], new_key(secure_redis, "occupier")):
        waiter = threading.Thread(target=wait_in_queue)
        waiter.start()
        queued = keys.job_stream(MODEL)
        end = time.monotonic() + 10
        while redis_admin.xlen(queued) < 2:  # the occupier's job and its own, the one the queue may hold
            assert time.monotonic() < end, "the waiting call's job was not queued"
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as caught:
            unary(gateways[1], refused, max_tokens=10)
        waiter.join()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in caught.value.details()
    assert [e.code() for e in errors] == [grpc.StatusCode.DEADLINE_EXCEEDED]
    print(f"queue full: {used(redis_admin, refused)}; never left the queue: {used(redis_admin, waited)}")
    assert used(redis_admin, refused) == (0, 0)
    assert settled(redis_admin, waited, below=1) == (0, 0)


def test_charges_add_up_exactly_across_two_gateways(
    gateways: list[Stack],
    secure_redis: RedisServer,
    redis_admin: redis.Redis,
    prompt_tokens: int,
    fresh_minute: None,
) -> None:
    key = new_key(secure_redis, "two-gateways", rpm=100, tpm=100_000)
    replies: list[chat_pb2.ChatCompletionResponse] = []
    for i in range(3):  # one call on each gateway at once: one runs, one waits (the queue holds one)
        threads = [
            threading.Thread(
                target=lambda s=stack, n=3 + 2 * i + j: replies.append(unary(s, key, max_tokens=n))
            )
            for j, stack in enumerate(gateways)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    expected = sum(r.usage.total_tokens for r in replies)
    assert len(replies) == 6 and expected == 6 * prompt_tokens + sum(3 + i for i in range(6))
    print(f"6 calls on two gateways: charged {used(redis_admin, key)}, generated {expected}")
    assert settled(redis_admin, key, below=expected + 1) == (6, expected)


def http_post(
    stack: Stack, key: str, idempotency_key: str, stream: bool = False, **fields: object
) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "stream": stream, **fields}
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": idempotency_key}
    return httpx.post(f"{stack.http_url}/v1/chat/completions", json=body, headers=headers, timeout=30)


def test_a_retried_call_with_an_idempotency_key_is_one_job_and_one_charge(
    gateways: list[Stack],
    secure_redis: RedisServer,
    redis_admin: redis.Redis,
    prompt_tokens: int,
    fresh_minute: None,
) -> None:
    key = new_key(secure_redis, "idempotent", rpm=100, tpm=100_000)
    same = f"retry-{uuid.uuid4()}"
    jobs_before = jobs_ever_queued(redis_admin)
    first = http_post(gateways[0], key, same, max_tokens=4)
    again = http_post(gateways[1], key, same, max_tokens=4)  # after it finished, on the other gateway
    assert first.status_code == again.status_code == 200, again.text
    assert first.json()["id"] == again.json()["id"]
    assert first.json()["choices"] == again.json()["choices"]
    assert jobs_ever_queued(redis_admin) == jobs_before + 1
    assert used(redis_admin, key) == (1, prompt_tokens + 4)

    # A retry while the first call still runs (on the other gateway) waits for the same job.
    running = f"retry-{uuid.uuid4()}"
    replies: list[httpx.Response] = []
    first_call = threading.Thread(
        target=lambda: replies.append(http_post(gateways[0], key, running, max_tokens=20))
    )
    first_call.start()
    time.sleep(0.4)
    retry = http_post(gateways[1], key, running, max_tokens=20)
    first_call.join()
    assert retry.status_code == replies[0].status_code == 200, retry.text
    assert retry.json()["id"] == replies[0].json()["id"]
    assert (
        retry.json()["choices"][0]["message"]["content"]
        == replies[0].json()["choices"][0]["message"]["content"]
    )
    assert jobs_ever_queued(redis_admin) == jobs_before + 2
    print(
        f"two calls, each sent twice under one key: {jobs_ever_queued(redis_admin) - jobs_before} jobs,"
        f" charged {used(redis_admin, key)}"
    )
    assert used(redis_admin, key) == (2, 2 * prompt_tokens + 24)

    # A streamed retry gets the same text as chunks.
    streamed = http_post(gateways[0], key, same, stream=True, max_tokens=4)
    assert streamed.status_code == 200
    assert sse_text(streamed) == first.json()["choices"][0]["message"]["content"]
    assert jobs_ever_queued(redis_admin) == jobs_before + 2


def sse_text(response: httpx.Response) -> str:
    chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_a_different_body_under_the_same_idempotency_key_is_refused(
    gateways: list[Stack], secure_redis: RedisServer, redis_admin: redis.Redis
) -> None:
    key = new_key(secure_redis, "conflict", rpm=100, tpm=100_000)
    same = f"conflict-{uuid.uuid4()}"
    assert http_post(gateways[0], key, same, max_tokens=2).status_code == 200
    other = http_post(gateways[1], key, same, max_tokens=3)
    assert other.status_code == 409, other.text
    assert same in other.json()["error"]["message"]
    with grpc.insecure_channel(gateways[0].address) as channel, pytest.raises(grpc.RpcError) as caught:
        chat_pb2_grpc.ChatServiceStub(channel).ChatCompletion(
            chat_request(PROMPT, max_tokens=5), metadata=metadata(key, same), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS and same in caught.value.details()
    # Another API key's calls never meet this key's idempotency keys.
    assert (
        http_post(gateways[0], new_key(secure_redis, "conflict-other"), same, max_tokens=3).status_code == 200
    )


def test_a_default_max_tokens_is_clamped_to_the_keys_budget(
    gateways: list[Stack],
    secure_redis: RedisServer,
    redis_admin: redis.Redis,
    prompt_tokens: int,
    fresh_minute: None,
) -> None:
    key = new_key(secure_redis, "small-tpm", tpm=prompt_tokens + 7)  # far below the default 1024
    reply = unary(gateways[0], key)  # sets no max_tokens
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 7
    assert used(redis_admin, key) == (1, prompt_tokens + 7)


def test_a_retry_of_an_answered_call_is_answered_when_the_keys_minute_is_used_up(
    gateways: list[Stack], secure_redis: RedisServer, redis_admin: redis.Redis, fresh_minute: None
) -> None:
    # The retry costs nothing, so it must not be refused by the limit its first call used up.
    key = new_key(secure_redis, "one-a-minute", rpm=1, tpm=100_000)
    same = f"retry-{uuid.uuid4()}"
    first = http_post(gateways[0], key, same, max_tokens=4)
    assert first.status_code == 200, first.text
    other = http_post(gateways[0], key, f"other-{uuid.uuid4()}", max_tokens=4)
    assert other.status_code == 429  # the key's one request of this minute is spent
    again = http_post(gateways[1], key, same, max_tokens=4)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
