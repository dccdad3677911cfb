"""The integration stack: real redis-server, gateway and a vLLM worker, real model.

One stack serves the whole session (vLLM starts in about 20 s on CPU); each test
ends by checking that it left no job, pending entry or cancel flag behind.
"""

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import groq
import grpc
import openai
import pytest
import redis

from chat.v1 import chat_pb2_grpc
from devstack.redis_server import RedisServer
from tests.integration.stack import Stack, assert_nothing_leaked, print_log_tails

# Generations in tests stay short: requests that set no max_tokens get this many.
TEST_DEFAULT_MAX_TOKENS = "64"
# The worker's engine runs shorter than the model's own 8,192 tokens, so tests can check
# that gateways validate against what the engine really runs with.
ENGINE_CONTEXT_WINDOW = 4096


@pytest.fixture(scope="session")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = Path(tmp_path_factory.mktemp("logs"))
    stack = Stack(
        redis_server,
        log_dir,
        gateway_env={"GATEWAY_DEFAULT_MAX_TOKENS": TEST_DEFAULT_MAX_TOKENS},
        worker_env={
            "WORKER_CANCEL_POLL_SECONDS": "0.05",
            "WORKER_VLLM_MAX_MODEL_LEN": str(ENGINE_CONTEXT_WINDOW),
            "WORKER_MAX_CONCURRENCY": "16",
        },
    )
    try:
        stack.start_gateway()
        stack.start_worker()
        stack.wait_worker_ready()
        stack.wait_context_window(ENGINE_CONTEXT_WINDOW)
        yield stack
    finally:
        stack.stop()
        print_log_tails(log_dir, 15)


@pytest.fixture(scope="session")
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    uses_stack = "stack" in request.fixturenames
    client = request.getfixturevalue("redis_client") if uses_stack else None
    stack = request.getfixturevalue("stack") if uses_stack else None
    yield
    if client is not None and stack is not None:
        assert_nothing_leaked(client, stack.worker_metrics_ports)


@pytest.fixture(scope="session")
def groq_client(stack: Stack) -> Iterator[groq.Groq]:
    """The groq SDK pointed at the gateway's HTTP API (no retries: tests see every error)."""
    with groq.Groq(base_url=stack.http_url, api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="session")
def openai_client(stack: Stack) -> Iterator[openai.OpenAI]:
    """The openai SDK pointed at the gateway's /v1 (no retries: tests see every error)."""
    with openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="session")
def stub(stack: Stack) -> Iterator[chat_pb2_grpc.ChatServiceStub]:
    with grpc.insecure_channel(stack.address) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


@pytest.fixture
async def aio_stub(stack: Stack) -> AsyncIterator[chat_pb2_grpc.ChatServiceStub]:
    async with grpc.aio.insecure_channel(stack.address) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)
