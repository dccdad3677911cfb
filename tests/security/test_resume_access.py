"""Who may read a completion again, and what that costs (gateway/completion_log.py).

A completion id is not a secret (it is in logs, in client errors): only the API key that made
the completion may resume or get it, and to any other key it does not exist (404, NOT_FOUND,
worded as for an unknown id). Resuming is free: the key pays once, for what its job generated.

Its own stack: auth on, the resume grace of test stacks (2 s), and one benchmark-engine worker
at 20 tokens per second, so a stream can be cut after a known number of tokens ("t1 t2 ...").
"""

import uuid
from collections.abc import Iterable, Iterator

import grpc
import httpx
import pytest
import redis

from chat.v1 import chat_pb2, chat_pb2_grpc
from devstack.redis_server import RedisServer
from tests.integration.stack import Stack, chat_request, stream_text
from tests.security.conftest import assert_only_accounting_left, new_key
from tests.security.test_charges import metadata, settled

TOKENS_PER_SECOND = 20
PROMPT = "Count for me."


@pytest.fixture(scope="module")
def resume_stack(secure_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        secure_redis,
        tmp_path_factory.mktemp("resume-logs"),
        gateway_env={"GATEWAY_AUTH": "on", "GATEWAY_AUTH_CACHE_SECONDS": "0"},
        worker_env={
            "WORKER_ENGINE": "bench",
            "WORKER_BENCH_TOKENS_PER_SECOND": str(TOKENS_PER_SECOND),
            "WORKER_CANCEL_POLL_SECONDS": "0.05",
        },
    )
    try:
        stack.start_gateway()
        stack.start_worker()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(autouse=True)
def nothing_leaked(resume_stack: Stack, redis_admin: redis.Redis) -> Iterator[None]:
    """No job, cancel flag or lease-less log left (keys and their rate-limit windows stay)."""
    yield
    assert_only_accounting_left(redis_admin)


@pytest.fixture(scope="module")
def stub(resume_stack: Stack) -> Iterator[chat_pb2_grpc.ChatServiceStub]:
    with grpc.insecure_channel(resume_stack.address) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


@pytest.fixture(scope="module")
def prompt_tokens(stub: chat_pb2_grpc.ChatServiceStub, secure_redis: RedisServer) -> int:
    key = new_key(secure_redis, "measure")
    reply = stub.ChatCompletion(chat_request(PROMPT, max_tokens=1), metadata=metadata(key), timeout=30)
    return int(reply.usage.prompt_tokens)


def bench_text(n: int) -> str:
    """What the benchmark engine generates for max_tokens=n."""
    return "".join(f"t{i} " for i in range(1, n + 1))


def http_get(stack: Stack, key: str | None, completion_id: str, stream: bool = False) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    params = {"stream": "true"} if stream else {}
    url = f"{stack.http_url}/openai/v1/chat/completions/{completion_id}"
    return httpx.get(url, params=params, headers=headers, timeout=30)


def stream_code(stream: Iterable[object]) -> grpc.StatusCode:
    """The status a whole stream ends with."""
    try:
        for _ in stream:
            pass
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


def cut_stream(
    stub: chat_pb2_grpc.ChatServiceStub, key: str, max_tokens: int, after_chunks: int = 3
) -> list[chat_pb2.ChatCompletionChunk]:
    """Streams a call and cancels it after `after_chunks` chunks of text; returns the chunks seen."""
    call = stub.StreamChatCompletion(
        chat_request(PROMPT, max_tokens=max_tokens), metadata=metadata(key), timeout=30
    )
    seen = []
    for chunk in call:
        seen.append(chunk)
        if sum(bool(c.choices[0].delta.content) for c in seen) == after_chunks:
            call.cancel()
            break
    return seen


# ---- only the owner's key reads a completion ----


def test_another_keys_completion_is_not_found_over_http(
    resume_stack: Stack, secure_redis: RedisServer
) -> None:
    owner, other = new_key(secure_redis, "http-owner"), new_key(secure_redis, "http-other")
    with grpc.insecure_channel(resume_stack.address) as channel:
        reply = chat_pb2_grpc.ChatServiceStub(channel).ChatCompletion(
            chat_request(PROMPT, max_tokens=5), metadata=metadata(owner), timeout=30
        )
    unknown = f"chatcmpl-{uuid.uuid4().hex}"
    for stream in (False, True):
        theirs = http_get(resume_stack, other, reply.id, stream)
        nothing = http_get(resume_stack, other, unknown, stream)
        assert theirs.status_code == nothing.status_code == 404
        assert theirs.json()["error"]["code"] == "completion_not_found"
        # Word for word what an id that never existed gets: the answer tells nobody it exists.
        message = theirs.json()["error"]["message"].replace(reply.id, "ID")
        assert message == nothing.json()["error"]["message"].replace(unknown, "ID")
        assert reply.choices[0].message.content not in theirs.text

    assert http_get(resume_stack, None, reply.id).status_code == 401  # no key: not even "not found"
    mine = http_get(resume_stack, owner, reply.id)
    assert mine.status_code == 200
    assert (
        mine.json()["choices"][0]["message"]["content"] == reply.choices[0].message.content == bench_text(5)
    )
    resumed = http_get(resume_stack, owner, reply.id, stream=True)
    assert resumed.status_code == 200 and "t5 " in resumed.text and resumed.text.endswith("data: [DONE]\n\n")


def test_another_keys_completion_is_not_found_over_grpc(
    stub: chat_pb2_grpc.ChatServiceStub, secure_redis: RedisServer
) -> None:
    owner, other = new_key(secure_redis, "grpc-owner"), new_key(secure_redis, "grpc-other")
    reply = stub.ChatCompletion(chat_request(PROMPT, max_tokens=5), metadata=metadata(owner), timeout=30)
    get = chat_pb2.GetChatCompletionRequest(id=reply.id)
    resume = chat_pb2.ResumeChatCompletionRequest(id=reply.id)

    with pytest.raises(grpc.RpcError) as theirs:
        stub.GetChatCompletion(get, metadata=metadata(other), timeout=10)
    assert theirs.value.code() == grpc.StatusCode.NOT_FOUND
    assert reply.choices[0].message.content not in str(theirs.value.details())
    stream = stub.ResumeChatCompletion(resume, metadata=metadata(other), timeout=10)
    assert stream_code(stream) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as anonymous:
        stub.GetChatCompletion(get, timeout=10)
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED

    mine = stub.GetChatCompletion(get, metadata=metadata(owner), timeout=10)
    assert mine.choices[0].message.content == reply.choices[0].message.content
    again = list(stub.ResumeChatCompletion(resume, metadata=metadata(owner), timeout=10))
    assert stream_text(again) == bench_text(5)


# ---- resuming is free ----


def test_a_cut_stream_resumed_to_its_end_is_charged_once(
    stub: chat_pb2_grpc.ChatServiceStub,
    resume_stack: Stack,
    secure_redis: RedisServer,
    redis_admin: redis.Redis,
    prompt_tokens: int,
    fresh_minute: None,
) -> None:
    # One request a minute: the resumes below must not need another.
    key = new_key(secure_redis, "resumed", rpm=1, tpm=100_000)
    seen = cut_stream(stub, key, max_tokens=60)
    resume = chat_pb2.ResumeChatCompletionRequest(id=seen[0].id, starting_after=seen[-1].sequence_number)
    rest = list(stub.ResumeChatCompletion(resume, metadata=metadata(key), timeout=30))
    assert stream_text(seen) + stream_text(rest) == bench_text(60)
    assert rest[-1].usage.completion_tokens == 60

    # Read again in full, on both transports, after the end: still nothing more to pay.
    from_the_start = chat_pb2.ResumeChatCompletionRequest(id=seen[0].id)
    whole = list(stub.ResumeChatCompletion(from_the_start, metadata=metadata(key), timeout=30))
    assert stream_text(whole) == bench_text(60)
    got = stub.GetChatCompletion(chat_pb2.GetChatCompletionRequest(id=seen[0].id), metadata=metadata(key))
    assert got.usage == rest[-1].usage
    assert http_get(resume_stack, key, seen[0].id, stream=True).status_code == 200
    assert http_get(resume_stack, key, seen[0].id).status_code == 200

    charged = settled(redis_admin, key, below=prompt_tokens + 60 + 1)
    print(f"stream of 60 tokens cut after 3, resumed, read 4 times more: charged {charged}")
    assert charged == (1, prompt_tokens + 60)


def test_a_cut_stream_nobody_resumes_is_charged_what_ran_in_the_grace(
    stub: chat_pb2_grpc.ChatServiceStub,
    secure_redis: RedisServer,
    redis_admin: redis.Redis,
    prompt_tokens: int,
    fresh_minute: None,
) -> None:
    key = new_key(secure_redis, "left", rpm=100, tpm=100_000)
    seen = cut_stream(stub, key, max_tokens=400)  # 20 s of tokens, were it to run to its end
    requests, tokens = settled(redis_admin, key, below=prompt_tokens + 400, timeout=15)
    generated = tokens - prompt_tokens
    print(
        f"stream cut after {stream_text(seen).count('t')} tokens, not resumed: charged {generated} generated"
    )
    # It ran on through the 2 s grace (a resume would have found the rest), then was cancelled.
    assert requests == 1
    assert 3 + TOKENS_PER_SECOND <= generated < 3 + 5 * TOKENS_PER_SECOND
