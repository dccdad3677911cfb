"""Resumable streams against the real stack: a stream cut on the wire is picked up again after
the last chunk its caller saw, and a completion can be read back by id (gateway/completion_log.py).

Cuts happen in a TCP proxy between the client and the gateway (tests/tcp_proxy.py), as when a
load balancer or a mobile network drops a connection: the gateway sees a disconnect, keeps the
job running for its resume grace (2 s in test stacks), and the resumed call gets the rest. The
generation is greedy (temperature 0, fixed seed), so a cut-and-resumed run must put together
exactly the text of an uncut run of the same request.
"""

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from chat.v1 import chat_pb2, chat_pb2_grpc
from devstack.redis_server import RedisServer
from tests.integration.stack import MODEL, Stack, chat_request, stream_text
from tests.tcp_proxy import TcpProxy

PROMPT = "Write a short poem about the sea."
MAX_TOKENS = 48  # long enough to cut mid-way, short enough for a 2-core machine
SEED = 7
CUT_AFTER = 3  # text chunks the caller sees before its connection is cut


@dataclass(frozen=True)
class Sse:
    """One server-sent event: its `id` (None: it has none), its data; or a comment line."""

    id: int | None
    data: str
    comment: bool = False

    @property
    def chunk(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.data)
        return parsed

    @property
    def text(self) -> str:
        if self.comment or self.data == "[DONE]" or not self.chunk["choices"]:
            return ""
        return str(self.chunk["choices"][0]["delta"].get("content") or "")


async def sse(lines: AsyncIterator[str]) -> AsyncGenerator[Sse]:
    event_id: int | None = None
    async for line in lines:
        if line.startswith("id: "):
            event_id = int(line.removeprefix("id: "))
        elif line.startswith("data: "):
            yield Sse(event_id, line.removeprefix("data: "))
            event_id = None
        elif line.startswith(":"):
            yield Sse(None, line, comment=True)


def sse_sync(response: httpx.Response) -> list[Sse]:
    """The events of a response read whole (a sync client)."""
    events, event_id = [], None
    for line in response.text.splitlines():
        if line.startswith("id: "):
            event_id = int(line.removeprefix("id: "))
        elif line.startswith("data: "):
            events.append(Sse(event_id, line.removeprefix("data: ")))
            event_id = None
    return events


def text(events: list[Sse]) -> str:
    return "".join(e.text for e in events)


def uncut_text(events: list[Sse]) -> str:
    """The text of an uncut run, which must not be empty for comparisons with it to mean anything."""
    whole = text(events)
    assert whole, "the uncut run generated nothing"
    return whole


def ids(events: list[Sse]) -> list[int]:
    return [e.id for e in events if e.id is not None]


def strictly_increasing(numbers: list[int]) -> bool:
    return all(a < b for a, b in pairwise(numbers))


def body(stream: bool = True) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "seed": SEED,
        "stream": stream,
    }


def grpc_request() -> chat_pb2.ChatCompletionRequest:
    return chat_request(PROMPT, max_tokens=MAX_TOKENS, temperature=0, seed=SEED)


@pytest.fixture(scope="module")
def uncut_http(stack: Stack) -> list[Sse]:
    """The events of the request streamed whole over HTTP: what every cut run must add up to."""
    response = httpx.post(f"{stack.http_url}/openai/v1/chat/completions", json=body(), timeout=60)
    assert response.status_code == 200, response.text
    return sse_sync(response)


@pytest.fixture(scope="module")
def uncut_grpc(stack: Stack) -> list[chat_pb2.ChatCompletionChunk]:
    with grpc.insecure_channel(stack.address) as channel:
        return list(chat_pb2_grpc.ChatServiceStub(channel).StreamChatCompletion(grpc_request(), timeout=60))


# ---- a stream cut on the wire, resumed ----


@pytest.mark.parametrize(
    ("prefix", "cursor"),
    [("/openai/v1", "starting_after"), ("/openai/v1", "Last-Event-ID"), ("/v1", "starting_after")],
)
async def test_an_http_stream_cut_mid_way_resumes_with_exactly_the_rest(
    stack: Stack, uncut_http: list[Sse], prefix: str, cursor: str
) -> None:
    seen: list[Sse] = []
    with TcpProxy(stack.http_port) as proxy:
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy.port}", timeout=60) as client,
            client.stream("POST", f"{prefix}/chat/completions", json=body()) as response,
        ):
            assert response.status_code == 200
            async with aclosing(sse(response.aiter_lines())) as events:
                async for event in events:
                    seen.append(event)
                    if sum(bool(e.text) for e in seen) == CUT_AFTER:
                        proxy.cut()
                        break
    completion_id, last = seen[0].chunk["id"], seen[-1].id
    assert last is not None

    async with httpx.AsyncClient(base_url=stack.http_url, timeout=60) as client:
        # What the completion holds so far: a prefix of the whole, finished or not.
        so_far = (await client.get(f"{prefix}/chat/completions/{completion_id}")).json()
        assert uncut_text(uncut_http).startswith(so_far["choices"][0]["message"]["content"])
        assert (so_far["choices"][0]["finish_reason"] is None) == (so_far["usage"] is None)

        if cursor == "starting_after":
            params, headers = {"stream": "true", "starting_after": str(last)}, {}
        else:
            params, headers = {"stream": "true"}, {"Last-Event-ID": str(last)}
        path = f"{prefix}/chat/completions/{completion_id}"
        async with client.stream("GET", path, params=params, headers=headers) as resumed:
            assert resumed.status_code == 200
            assert resumed.headers["content-type"].startswith("text/event-stream")
            rest = [event async for event in sse(resumed.aiter_lines())]

    print(f"cut after {CUT_AFTER} chunks (id {last}); resumed: {len(rest)} events, {text(rest)!r}")
    assert rest[-1].data == "[DONE]"
    assert all(event_id > last for event_id in ids(rest)), "a chunk at or before the cursor came again"
    assert strictly_increasing(ids(rest))
    assert {e.chunk["id"] for e in rest[:-1]} == {completion_id}
    # Every resumed chunk says which engine wrote it, though the role chunk is not sent again.
    assert {e.chunk["system_fingerprint"] for e in rest[:-1]} == {seen[0].chunk["system_fingerprint"]}
    assert text(seen) + text(rest) == uncut_text(uncut_http)
    assert (
        rest[-2].chunk["choices"][0]["finish_reason"] == uncut_http[-2].chunk["choices"][0]["finish_reason"]
    )


async def test_a_grpc_stream_cut_mid_way_resumes_with_exactly_the_rest(
    stack: Stack, uncut_grpc: list[chat_pb2.ChatCompletionChunk], aio_stub: chat_pb2_grpc.ChatServiceStub
) -> None:
    seen: list[chat_pb2.ChatCompletionChunk] = []
    with TcpProxy(stack.port) as proxy:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
            call = chat_pb2_grpc.ChatServiceStub(channel).StreamChatCompletion(grpc_request(), timeout=60)
            async for chunk in call:
                seen.append(chunk)
                if sum(bool(c.choices[0].delta.content) for c in seen) == CUT_AFTER:
                    proxy.cut()
                    break
            call.cancel()
    last = seen[-1].sequence_number

    resume = chat_pb2.ResumeChatCompletionRequest(id=seen[0].id, starting_after=last)
    rest = [chunk async for chunk in aio_stub.ResumeChatCompletion(resume, timeout=60)]

    print(f"cut after {CUT_AFTER} chunks (sequence number {last}); resumed: {stream_text(rest)!r}")
    numbers = [c.sequence_number for c in rest]
    assert numbers[0] > last and strictly_increasing(numbers)
    assert {c.id for c in rest} == {seen[0].id}
    assert stream_text(uncut_grpc)  # the comparison below means something
    assert stream_text(seen) + stream_text(rest) == stream_text(uncut_grpc)
    assert rest[-1].choices[0].finish_reason == uncut_grpc[-1].choices[0].finish_reason
    assert rest[-1].usage.completion_tokens == uncut_grpc[-1].usage.completion_tokens


# ---- a finished completion, again ----


def test_http_resume_after_the_end_replays_the_whole_stream(stack: Stack, uncut_http: list[Sse]) -> None:
    completion_id = uncut_http[0].chunk["id"]
    replay = httpx.get(
        f"{stack.http_url}/openai/v1/chat/completions/{completion_id}", params={"stream": "true"}, timeout=30
    )
    assert replay.status_code == 200
    events = sse_sync(replay)
    assert events[0].chunk["choices"][0]["delta"]["role"] == "assistant"
    assert text(events) == uncut_text(uncut_http)
    # Chunk boundaries may differ (a replay reads deltas faster than they came), the positions not.
    assert ids(events)[0] == ids(uncut_http)[0] and ids(events)[-1] == ids(uncut_http)[-1]
    assert strictly_increasing(ids(events))
    assert events[-2].chunk["choices"] == uncut_http[-2].chunk["choices"]  # finish_reason
    assert events[-2].chunk["x_groq"]["usage"] == uncut_http[-2].chunk["x_groq"]["usage"]
    assert events[-1].data == "[DONE]"


def test_http_resume_after_the_last_chunk_ends_at_once_with_done(stack: Stack, uncut_http: list[Sse]) -> None:
    # The connection broke after the last chunk but before [DONE]: there is nothing left to send,
    # and the stream must end as a finished one does, not as an error or an empty 200.
    completion_id, last = uncut_http[0].chunk["id"], ids(uncut_http)[-1]
    rest = httpx.get(
        f"{stack.http_url}/openai/v1/chat/completions/{completion_id}",
        params={"stream": "true", "starting_after": str(last)},
        timeout=30,
    )
    assert rest.status_code == 200
    assert [e.data for e in sse_sync(rest)] == ["[DONE]"]


def test_http_get_returns_the_finished_completion(
    stack: Stack, uncut_http: list[Sse], openai_client: openai.OpenAI
) -> None:
    last = uncut_http[-2].chunk  # the chunk with finish_reason and usage
    got = httpx.get(f"{stack.http_url}/openai/v1/chat/completions/{last['id']}", timeout=30)
    assert got.status_code == 200
    completion = got.json()
    assert completion["id"] == last["id"] and completion["object"] == "chat.completion"
    assert completion["model"] == MODEL and completion["created"] == last["created"]
    assert completion["choices"][0]["message"] == {"role": "assistant", "content": uncut_text(uncut_http)}
    assert completion["choices"][0]["finish_reason"] == last["choices"][0]["finish_reason"]
    assert completion["usage"] == last["x_groq"]["usage"]
    assert completion["system_fingerprint"] == last["system_fingerprint"]
    # The openai SDK reads it too (its chat.completions.retrieve is this very GET).
    retrieved = openai_client.chat.completions.retrieve(last["id"])
    assert retrieved.choices[0].message.content == uncut_text(uncut_http)
    assert retrieved.usage is not None
    assert retrieved.usage.completion_tokens == completion["usage"]["completion_tokens"]


async def test_grpc_resume_after_the_end_replays_the_whole_stream(
    uncut_grpc: list[chat_pb2.ChatCompletionChunk], aio_stub: chat_pb2_grpc.ChatServiceStub
) -> None:
    first, last = uncut_grpc[0], uncut_grpc[-1]
    replay = [
        chunk
        async for chunk in aio_stub.ResumeChatCompletion(
            chat_pb2.ResumeChatCompletionRequest(id=first.id), timeout=30
        )
    ]
    assert replay[0].choices[0].delta.role == "assistant"
    assert replay[0].sequence_number == first.sequence_number
    assert stream_text(replay) == stream_text(uncut_grpc)
    assert replay[-1].sequence_number == last.sequence_number
    assert replay[-1].choices[0].finish_reason == last.choices[0].finish_reason
    assert replay[-1].usage == last.usage


async def test_grpc_resume_after_the_last_chunk_ends_ok_with_nothing(
    uncut_grpc: list[chat_pb2.ChatCompletionChunk], aio_stub: chat_pb2_grpc.ChatServiceStub
) -> None:
    request = chat_pb2.ResumeChatCompletionRequest(
        id=uncut_grpc[0].id, starting_after=uncut_grpc[-1].sequence_number
    )
    call = aio_stub.ResumeChatCompletion(request, timeout=30)
    assert [chunk async for chunk in call] == []
    assert await call.code() == grpc.StatusCode.OK


async def test_grpc_get_returns_the_finished_completion(
    uncut_grpc: list[chat_pb2.ChatCompletionChunk], aio_stub: chat_pb2_grpc.ChatServiceStub
) -> None:
    last = uncut_grpc[-1]
    got = await aio_stub.GetChatCompletion(chat_pb2.GetChatCompletionRequest(id=last.id), timeout=30)
    assert got.id == last.id and got.model == MODEL and got.created == last.created
    assert got.choices[0].message.content == stream_text(uncut_grpc)
    assert got.choices[0].finish_reason == last.choices[0].finish_reason
    assert got.usage == last.usage
    assert got.system_fingerprint == last.system_fingerprint


def test_http_event_ids_strictly_increase_along_a_stream(uncut_http: list[Sse]) -> None:
    chunks = [e for e in uncut_http if e.data != "[DONE]"]
    assert all(e.id is not None for e in chunks), "a chunk without an id to resume after"
    assert len(chunks) > CUT_AFTER and strictly_increasing(ids(chunks))


def test_grpc_sequence_numbers_strictly_increase_along_a_stream(
    uncut_grpc: list[chat_pb2.ChatCompletionChunk],
) -> None:
    assert len(uncut_grpc) > CUT_AFTER
    assert strictly_increasing([c.sequence_number for c in uncut_grpc])


# ---- ids that lead nowhere ----

UNKNOWN = f"chatcmpl-{uuid.uuid4().hex}"


@pytest.mark.parametrize("completion_id", [UNKNOWN, "chatcmpl-not-an-id", "nonsense"])
@pytest.mark.parametrize("stream", ["false", "true"])
def test_an_unknown_or_malformed_completion_id_is_404_completion_not_found(
    stack: Stack, completion_id: str, stream: str
) -> None:
    got = httpx.get(
        f"{stack.http_url}/openai/v1/chat/completions/{completion_id}", params={"stream": stream}, timeout=10
    )
    assert got.status_code == 404
    assert got.json()["error"]["code"] == "completion_not_found"


@pytest.mark.parametrize("completion_id", [UNKNOWN, "chatcmpl-not-an-id"])
async def test_an_unknown_or_malformed_completion_id_is_grpc_not_found(
    aio_stub: chat_pb2_grpc.ChatServiceStub, completion_id: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as got:
        await aio_stub.GetChatCompletion(chat_pb2.GetChatCompletionRequest(id=completion_id), timeout=10)
    assert got.value.code() == grpc.StatusCode.NOT_FOUND
    resume = aio_stub.ResumeChatCompletion(chat_pb2.ResumeChatCompletionRequest(id=completion_id), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as resumed:
        async for _ in resume:
            pass
    assert resumed.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("params", "headers"),
    [({"starting_after": "abc"}, {}), ({}, {"Last-Event-ID": "abc"})],
    ids=["query", "header"],
)
def test_a_cursor_that_is_not_a_number_is_400_naming_starting_after(
    stack: Stack, params: dict[str, str], headers: dict[str, str]
) -> None:
    got = httpx.get(
        f"{stack.http_url}/v1/chat/completions/{UNKNOWN}",
        params={"stream": "true", **params},
        headers=headers,
        timeout=10,
    )
    assert got.status_code == 400
    error = got.json()["error"]
    assert error["param"] == "starting_after" and "starting_after" in error["message"]


# ---- keepalives on a silent stream ----


@pytest.fixture
def quiet_stack(tmp_path: Path) -> Iterator[Stack]:
    """A gateway of its own (own redis-server, no worker yet) that sends keepalives after 0.2 s."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    stack = Stack(
        server,
        tmp_path,
        gateway_env={"GATEWAY_SSE_KEEPALIVE_SECONDS": "0.2"},
        worker_env={"WORKER_ENGINE": "bench", "WORKER_BENCH_TOKENS_PER_SECOND": "0"},
    )
    try:
        stack.start_gateway()
        yield stack
    finally:
        stack.stop()
        server.stop()


async def test_a_stream_waiting_in_the_queue_gets_keepalive_comments(quiet_stack: Stack) -> None:
    request = {**body(), "max_tokens": 3}
    async with (
        httpx.AsyncClient(base_url=quiet_stack.http_url, timeout=30) as client,
        client.stream("POST", "/openai/v1/chat/completions", json=request) as response,
    ):
        assert response.status_code == 200
        events: list[Sse] = []
        async with aclosing(sse(response.aiter_lines())) as stream:
            async for event in stream:
                events.append(event)
                if sum(e.comment for e in events) == 2:
                    # The job has waited in the queue with no worker; one comes now and takes it.
                    started = time.monotonic()
                    quiet_stack.start_worker()
                    break
            events += [event async for event in stream]
    print(f"worker started and stream finished in {time.monotonic() - started:.1f} s")
    assert [e.data for e in events[:2]] == [": keepalive", ": keepalive"]
    chunks = [e for e in events if not e.comment]
    assert chunks[-1].data == "[DONE]" and text(chunks)  # the stream went on normally
    assert strictly_increasing(ids(chunks))
