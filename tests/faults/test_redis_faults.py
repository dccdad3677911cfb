"""Redis stops and comes back: explicit errors meanwhile, recovery without restarting anything."""

import time
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chat.v1 import chat_pb2_grpc
from common import keys
from devstack.redis_server import RedisServer
from tests.faults.conftest import GATEWAY_ENV, bench_text, check_clean
from tests.faults.helpers import TimedStream
from tests.integration.stack import MODEL, Stack, chat_request


def health_status(channel: grpc.Channel) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    return int(reply.status)


def wait_for(predicate, seconds: float) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while not predicate() and time.monotonic() - start < seconds:
        time.sleep(0.05)
    return time.monotonic() - start


def test_redis_restart_mid_load(
    fault_stack: Stack, fault_redis: RedisServer, fault_redis_client: redis.Redis
) -> None:
    fault_stack.start_gateway()
    fault_stack.start_worker()
    fault_stack.wait_worker_ready()
    channel = grpc.insecure_channel(fault_stack.address)
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    streams = [TimedStream(stub, chat_request(max_tokens=400)) for _ in range(4)]
    for stream in streams:
        stream.read(content_chunks=2)

    fault_redis.stop()  # no persistence in this test: everything in Redis is lost
    to_not_serving = wait_for(
        lambda: health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING, 10
    )
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        stub.ChatCompletion(chat_request(max_tokens=4), timeout=10)
    refused_in = time.monotonic() - start
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    fault_redis.start()
    restarted = time.monotonic()
    outcomes = []
    for stream in streams:  # each ends with an explicit status, not at its deadline
        with pytest.raises(grpc.RpcError) as lost:
            stream.read()
        outcomes.append(lost.value.code())
    streams_ended = time.monotonic() - restarted
    to_serving = wait_for(lambda: health_status(channel) == health_pb2.HealthCheckResponse.SERVING, 10)
    # Gateway and worker reconnected by themselves.
    reply = stub.ChatCompletion(chat_request(max_tokens=8), timeout=30)
    recovered = time.monotonic() - restarted
    print(
        f"Redis down -> NOT_SERVING in {to_not_serving:.1f}s, "
        f"new call refused in {refused_in * 1000:.0f} ms; "
        f"after restart: in-flight streams ended in {streams_ended:.1f}s, SERVING in {to_serving:.1f}s, "
        f"first completion after {recovered:.1f}s"
    )
    assert to_not_serving < 3
    assert refused_in < 3
    assert set(outcomes) == {grpc.StatusCode.UNAVAILABLE}
    assert streams_ended < 10
    assert reply.choices[0].message.content == bench_text(8)
    check_clean(fault_stack, fault_redis_client)


FILLERS = 32  # of 64 KiB each


def fill_past_maxmemory(client: redis.Redis) -> None:
    """Fills Redis with 2 MiB and sets maxmemory 1 MiB below what it then uses (noeviction, as
    deploy/base/redis.yaml runs it): every write that needs memory is refused until 1 MiB is
    freed, which the few keys gateway and worker delete meanwhile cannot do."""
    for i in range(FILLERS):
        client.set(f"filler:{i}", b"x" * 65536)
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", used - 1024 * 1024)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("filler:probe", b"x")


def test_a_full_redis_refuses_new_calls_with_resource_exhausted(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    fault_stack.start_gateway()
    fault_stack.start_worker()
    fault_stack.wait_worker_ready()
    stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(fault_stack.address))
    fill_past_maxmemory(fault_redis_client)
    outcomes = []
    for streaming in (False, True):
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            if streaming:
                list(stub.StreamChatCompletion(chat_request(max_tokens=4), timeout=10))
            else:
                stub.ChatCompletion(chat_request(max_tokens=4), timeout=10)
        outcomes.append((caught.value.code(), caught.value.details(), time.monotonic() - start))
    print("Redis over maxmemory: " + "; ".join(f"{c.name} in {t * 1000:.0f} ms" for c, _, t in outcomes))
    for code, details, seconds in outcomes:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "Redis is out of memory" in details
        assert seconds < 2
    fault_redis_client.delete(*[f"filler:{i}" for i in range(FILLERS)])
    reply = stub.ChatCompletion(chat_request(max_tokens=4), timeout=10)  # room again: served
    assert reply.choices[0].message.content == bench_text(4)
    check_clean(fault_stack, fault_redis_client)


def incr_aof(server: RedisServer) -> Path:
    """The append-only file Redis 7 appends writes to (appendonlydir/*.incr.aof)."""
    [path] = (server.data_dir / "appendonlydir").glob("*.incr.aof")
    return path


def test_a_job_lost_by_a_redis_crash_ends_its_call_unavailable(tmp_path: Path) -> None:
    # AOF with appendfsync everysec (what `make run` and the deploy use): a crash of the machine
    # loses the writes of the last second, which the page cache held but the disk did not. A
    # SIGKILL of redis-server, then the AOF cut back to its size before the submit, is that crash.
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    stack = Stack(server, tmp_path, gateway_env=dict(GATEWAY_ENV))
    client = redis.Redis.from_url(server.url)
    try:
        stack.start_gateway()  # no worker: the job stays queued
        stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(stack.address))
        time.sleep(1.5)  # the AOF holds the reply stream
        synced = incr_aof(server).stat().st_size
        call = stub.ChatCompletion.future(chat_request(max_tokens=4), timeout=20)
        assert wait_for(lambda: client.xlen(keys.job_stream(MODEL)) == 1, 5) < 5
        server.kill()
        killed = time.monotonic()
        with incr_aof(server).open("r+b") as aof:
            aof.truncate(synced)
        server.start()
        assert client.xlen(keys.job_stream(MODEL)) == 0  # the job is gone
        with pytest.raises(grpc.RpcError) as caught:
            call.result()
        ended = time.monotonic() - killed
        print(f"job lost by a Redis crash: call ended {caught.value.code().name} {ended:.1f}s after the kill")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
        assert "retry" in caught.value.details()
        assert ended < 8
    finally:
        client.close()
        stack.stop()
        server.stop()
