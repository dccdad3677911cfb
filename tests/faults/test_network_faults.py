"""A connection to Redis lost without a FIN (failover, partition): the worker must notice.

The worker reaches Redis through a TCP proxy that, on cue, goes silent on every open
connection without closing it: no reply, no reset, as when the peer vanished. The gateway
talks to Redis directly.
"""

import time

import grpc
import redis

from chat.v1 import chat_pb2_grpc
from common.redis_client import DEFAULT_SOCKET_TIMEOUT_SECONDS
from devstack.redis_server import RedisServer
from tests.faults.conftest import bench_text, check_clean
from tests.integration.stack import Stack, chat_request
from tests.tcp_proxy import TcpProxy


def test_a_worker_whose_redis_connections_go_silent_reconnects(
    fault_stack: Stack, fault_redis: RedisServer, fault_redis_client: redis.Redis
) -> None:
    with TcpProxy(fault_redis.port) as proxy:
        fault_stack.start_gateway()
        worker = fault_stack.start_worker(REDIS_URL=proxy.url)
        fault_stack.wait_worker_ready()
        stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(fault_stack.address))
        silent_connections = proxy.num_connections
        proxy.blackhole()
        start = time.monotonic()
        reply = stub.ChatCompletion(chat_request(max_tokens=4), timeout=60)
        served = time.monotonic() - start
        print(
            f"{silent_connections} worker connections to Redis went silent -> next completion after"
            f" {served:.1f}s (socket timeout {DEFAULT_SOCKET_TIMEOUT_SECONDS:.0f}s)"
        )
        assert reply.choices[0].message.content == bench_text(4)
        assert served < 3 * DEFAULT_SOCKET_TIMEOUT_SECONDS
        assert worker.poll() is None
        # Each pooled connection that went silent costs a socket timeout when it is next used, and
        # the steps that end the job may meet those the completion did not: in one CI run of
        # several, the job's progress record was still being deleted after 15 s.
        check_clean(
            fault_stack, fault_redis_client, timeout=silent_connections * DEFAULT_SOCKET_TIMEOUT_SECONDS + 15
        )
