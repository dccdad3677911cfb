"""The service on Redis Cluster: REDIS_URL redis-cluster://, a real 3-primary cluster.

One cluster for the module (devstack/redis_cluster.py, about 2 s to start) with
REDIS_JOB_STREAMS=3, so a model's jobs spread over three slots; two gateways, whose keys
live in their own slots (common/keys.py). Workers run the benchmark engine (token i of a
reply is `t{i} `, 20 per second): what is tested here is the queue on the cluster (every
script and command within one slot, continuation, cancellation, rate limits), which the
engine does not change. Each test ends checking that nothing is left in any shard.
"""

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
from redis.cluster import RedisCluster as SyncRedisCluster

from chat.v1 import chat_pb2, chat_pb2_grpc
from common import keys
from common.redis_client import connect
from devstack.redis_cluster import LocalRedisCluster
from gateway import apikeys
from tests.faults.helpers import TimedStream
from tests.faults.test_worker_faults import continued_tokens, generated_tokens
from tests.integration.stack import (
    MODEL,
    Stack,
    assert_nothing_leaked,
    chat_request,
    pending_jobs,
    print_log_tails,
    scrape,
    stream_text,
)

JOB_STREAMS = "3"
WORKER_ENV = {
    "WORKER_ENGINE": "bench",
    "WORKER_BENCH_TOKENS_PER_SECOND": "20",
    "WORKER_CANCEL_POLL_SECONDS": "0.05",
    "REDIS_JOB_STREAMS": JOB_STREAMS,
}
GATEWAY_ENV = {"GATEWAY_DEFAULT_MAX_TOKENS": "16", "REDIS_JOB_STREAMS": JOB_STREAMS}


def bench_text(n: int) -> str:
    return "".join(f"t{i} " for i in range(1, n + 1))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("cluster"), primaries=3)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def admin(cluster: LocalRedisCluster) -> Iterator[SyncRedisCluster]:
    """A plain cluster client, to look at what every shard holds."""
    host, port = cluster.url.removeprefix("redis-cluster://").split(",")[0].split(":")
    client = SyncRedisCluster(host=host, port=int(port))
    yield client
    client.close()


def new_stack(cluster: LocalRedisCluster, log_dir: Path, **gateway_env: str) -> Stack:
    return Stack(cluster, log_dir, gateway_env={**GATEWAY_ENV, **gateway_env}, worker_env=dict(WORKER_ENV))


@pytest.fixture(scope="module")
def stack(cluster: LocalRedisCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("cluster-logs")
    stack = new_stack(cluster, log_dir)
    try:
        stack.start_gateway()
        stack.start_worker()
        stack.start_worker()
        stack.wait_worker_ready(timeout=30)
        yield stack
    finally:
        stack.stop()
        print_log_tails(log_dir)


def check_clean(stack: Stack, admin: SyncRedisCluster) -> None:
    live = [p for p, w in zip(stack.worker_metrics_ports, stack.workers, strict=True) if w.poll() is None]
    assert_nothing_leaked(admin, live)  # type: ignore[arg-type]  # the same commands, every shard scanned


def stub_of(stack: Stack) -> chat_pb2_grpc.ChatServiceStub:
    return chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(stack.address))


def test_calls_complete_and_their_keys_spread_over_the_shards(
    cluster: LocalRedisCluster, stack: Stack, admin: SyncRedisCluster
) -> None:
    stub = stub_of(stack)
    reply = stub.ChatCompletion(chat_request(max_tokens=4), timeout=20)
    assert reply.choices[0].message.content == bench_text(4)
    assert reply.usage.completion_tokens == 4
    chunks = list(stub.StreamChatCompletion(chat_request(max_tokens=6), timeout=20))
    assert stream_text(chunks) == bench_text(6)
    with openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0) as client:
        streamed = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == bench_text(5)
        # Read back by id from its completion log, which lives in its gateway's slot.
        stored = client.chat.completions.retrieve(reply.id)
        assert stored.choices[0].message.content == bench_text(4)
    # Enough calls that all three job streams got some: each has its own slot on some primary.
    for _ in range(12):
        stub.ChatCompletion(chat_request(max_tokens=1), timeout=20)
    streams = [keys.job_stream(MODEL, shard) for shard in range(int(JOB_STREAMS))]
    assert all(admin.exists(s) for s in streams)
    assert len({cluster.primary_for(s).port for s in streams}) >= 2
    check_clean(stack, admin)


def test_a_second_gateway_resumes_a_stream_the_first_one_served(
    cluster: LocalRedisCluster, stack: Stack, admin: SyncRedisCluster, tmp_path: Path
) -> None:
    other = new_stack(cluster, tmp_path)
    try:
        other.start_gateway()
        call = stub_of(stack).StreamChatCompletion(chat_request(max_tokens=20), timeout=30)
        first = [next(call) for _ in range(4)]
        completion_id = first[0].id
        after = first[-1].sequence_number
        call.cancel()  # the caller drops; its job runs on for the resume grace
        resumed = stub_of(other).ResumeChatCompletion(
            chat_pb2.ResumeChatCompletionRequest(id=completion_id, starting_after=after), timeout=30
        )
        assert stream_text(first) + stream_text(list(resumed)) == bench_text(20)
    finally:
        other.stop()
    check_clean(stack, admin)


def test_a_stream_continues_on_another_worker_after_its_worker_is_killed(
    stack: Stack, admin: SyncRedisCluster
) -> None:
    stream = TimedStream(stub_of(stack), chat_request(max_tokens=60))
    stream.read(content_chunks=10)
    [owner] = [
        int(entry["consumer"].decode().split("-")[1])
        for entry in pending_jobs(admin)  # type: ignore[arg-type]  # a cluster client serves as well
    ]
    [survivor] = [i for i, w in enumerate(stack.workers) if i != owner and w.poll() is None]
    generated_before = generated_tokens(stack.worker_metrics_ports[survivor])
    stack.workers[owner].send_signal(signal.SIGKILL)
    stack.workers[owner].wait()
    stream.read()
    assert stream.text == bench_text(60)  # nothing missing, nothing twice
    continued_from = continued_tokens(stack, survivor)
    generated = generated_tokens(stack.worker_metrics_ports[survivor]) - generated_before
    assert continued_from >= 10 and generated == 60 - continued_from
    print(f"cluster: SIGKILL, continued after {continued_from} tokens; longest gap {stream.longest_gap:.2f}s")
    outcomes = scrape(stack.gateway_metrics_port)
    assert outcomes[f'chat_gateway_resumed_streams_total{{model="{MODEL}",outcome="continued"}}'] == 1
    check_clean(stack, admin)
    stack.start_worker()  # two again, for the tests after this one
    end = time.monotonic() + 30
    while True:
        try:
            scrape(stack.worker_metrics_ports[-1])
            break
        except OSError:
            assert time.monotonic() < end, "the new worker did not start"
            time.sleep(0.1)


def cancelled_jobs(stack: Stack) -> float:
    metric = f'chat_worker_aborts_total{{model="{MODEL}",reason="cancelled"}}'
    live = [p for p, w in zip(stack.worker_metrics_ports, stack.workers, strict=True) if w.poll() is None]
    return sum(scrape(port).get(metric, 0.0) for port in live)


def test_a_cancelled_stream_stops_its_job(stack: Stack, admin: SyncRedisCluster) -> None:
    before = cancelled_jobs(stack)
    call = stub_of(stack).StreamChatCompletion(chat_request(max_tokens=200), timeout=30)
    next(call)
    call.cancel()
    end = time.monotonic() + 10  # the resume grace (2 s), then the cancel flag, then the worker's poll
    while time.monotonic() < end:
        if (after := cancelled_jobs(stack)) > before:
            break
        time.sleep(0.1)
    assert after == before + 1
    check_clean(stack, admin)


def test_rate_limits_hold_across_gateways(
    cluster: LocalRedisCluster, admin: SyncRedisCluster, tmp_path: Path
) -> None:
    async def create() -> str:
        client = connect(cluster.url)
        try:
            return await apikeys.create(client, "cluster-burst", ["*"], 3, 0)
        finally:
            await client.aclose()

    key = asyncio.run(create())
    stacks = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        stacks.append(
            new_stack(cluster, tmp_path / str(i), GATEWAY_AUTH="on", GATEWAY_AUTH_CACHE_SECONDS="0")
        )
    try:
        for s in stacks:
            s.start_gateway()  # no workers of their own: the module's serve their jobs
        metadata = (("authorization", f"Bearer {key}"),)
        if (left := 60 - time.time() % 60) < 10:
            time.sleep(left)  # all four calls in one minute's window
        for i in range(3):
            stub_of(stacks[i % 2]).ChatCompletion(chat_request(max_tokens=1), metadata=metadata, timeout=30)
        with pytest.raises(grpc.RpcError) as refused:
            stub_of(stacks[1]).ChatCompletion(chat_request(max_tokens=1), metadata=metadata, timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "requests per minute" in refused.value.details()
    finally:
        for s in stacks:
            s.stop()
    for kind in ("ratelimit", "applied", "apikey", "apikeys"):
        for name in admin.scan_iter(f"{keys.PREFIX}:{kind}*"):
            admin.delete(name)
