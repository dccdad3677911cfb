"""The Python client package against the real stack."""

import json

import pytest

from chat_client import AsyncClient, BadRequestError, ChatCompletionChunk, Client, NotFoundError
from tests.integration.stack import MODEL, Stack, scrape
from tests.tcp_proxy import TcpProxy

HELLO = [{"role": "user", "content": "Say hello."}]


def test_sync_client_unary_and_stream(stack: Stack) -> None:
    with Client(stack.address) as client:
        completion = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
        assert completion.choices[0].message.content
        assert completion.usage.completion_tokens <= 8
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=HELLO, max_tokens=8, temperature=0, stream=True
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage is not None
        text = "".join(c.choices[0].delta.content for c in chunks)
        assert text == completion.choices[0].message.content


async def test_async_client_unary_and_stream(stack: Stack) -> None:
    async with AsyncClient(stack.address) as client:
        completion = await client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=8, temperature=0
        )
        stream = await client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=8, temperature=0, stream=True
        )
        text = "".join([chunk.choices[0].delta.content async for chunk in stream])
        assert text == completion.choices[0].message.content
        [model] = await client.models.list()
        assert model.id == MODEL


def test_client_maps_statuses_to_sdk_errors(stack: Stack) -> None:
    with Client(stack.address) as client:
        with pytest.raises(NotFoundError) as not_found:
            client.chat.completions.create(model="missing", messages=HELLO)
        assert not_found.value.field == "model"
        with pytest.raises(BadRequestError) as bad:
            # Greedy, and a reply that cannot close its object in 3 tokens: always cut off.
            client.chat.completions.create(
                model=MODEL,
                messages=[
                    {"role": "user", "content": "Give a JSON object describing a cat with name and age."}
                ],
                max_tokens=3,
                temperature=0,
                response_format={"type": "json_object"},
            )
        assert bad.value.reason == "json_validate_failed"
        assert bad.value.failed_generation is not None


def test_model_aliases_and_stop_as_a_string(stack: Stack) -> None:
    with Client(stack.address, model_aliases={"mixtral-8x7b-32768": MODEL}) as client:
        completion = client.chat.completions.create(
            model="mixtral-8x7b-32768",
            messages=[{"role": "user", "content": "Count from 1 to 9, separated by commas."}],
            stop="5",
            temperature=0,
            max_tokens=40,
        )
        assert completion.model == MODEL
        assert "5" not in completion.choices[0].message.content


def test_json_mode_through_the_client(stack: Stack) -> None:
    with Client(stack.address) as client:
        completion = client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": "You are a data API that responds in JSON."},
                {"role": "user", "content": "Give a JSON object with a city and its country."},
            ],
            temperature=0,
            max_tokens=100,
            response_format={"type": "json_object"},
        )
        assert isinstance(json.loads(completion.choices[0].message.content), dict)


# Long enough that a cut after a few chunks lands mid-generation; short for 2 cores.
STORY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell a short story about a lighthouse."}],
    "max_tokens": 48,
    "temperature": 0,
    "seed": 7,
}


def text_of(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content for c in chunks)


def assert_one_whole_stream(chunks: list[ChatCompletionChunk], expected: str) -> None:
    assert text_of(chunks) == expected  # nothing lost, nothing twice
    assert [c.choices[0].delta.role for c in chunks].count("assistant") == 1
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is not None
    numbers = [c.sequence_number for c in chunks]
    assert numbers == sorted(set(numbers))
    assert len({c.id for c in chunks}) == 1


def resumes_answered(stack: Stack) -> float:
    """ResumeChatCompletion calls the gateway answered in full: each proves a stream was resumed."""
    key = 'chat_gateway_requests_total{code="OK",model="",rpc="ResumeChatCompletion",transport="grpc"}'
    return scrape(stack.gateway_metrics_port).get(key, 0.0)


def test_a_stream_cut_mid_way_resumes_and_delivers_the_whole_text_once(stack: Stack) -> None:
    with Client(stack.address) as direct:
        uncut = text_of(list(direct.chat.completions.create(stream=True, **STORY)))
    resumed_before = resumes_answered(stack)
    with TcpProxy(stack.port) as proxy, Client(f"127.0.0.1:{proxy.port}") as client:
        chunks: list[ChatCompletionChunk] = []
        for chunk in client.chat.completions.create(stream=True, **STORY):
            chunks.append(chunk)
            if len(chunks) == 4:  # the role and three pieces of text
                proxy.cut()
        assert_one_whole_stream(chunks, uncut)
        assert resumes_answered(stack) == resumed_before + 1
        # The completion stays readable by id, whole.
        assert client.chat.completions.retrieve(chunks[0].id).choices[0].message.content == uncut


async def test_an_async_stream_cut_mid_way_resumes_too(stack: Stack) -> None:
    resumed_before = resumes_answered(stack)
    with TcpProxy(stack.port) as proxy:
        async with AsyncClient(stack.address) as direct, AsyncClient(f"127.0.0.1:{proxy.port}") as client:
            uncut = (await direct.chat.completions.create(**STORY)).choices[0].message.content
            chunks: list[ChatCompletionChunk] = []
            async for chunk in await client.chat.completions.create(stream=True, **STORY):
                chunks.append(chunk)
                if len(chunks) == 4:
                    proxy.cut()
            assert_one_whole_stream(chunks, uncut)
    assert resumes_answered(stack) == resumed_before + 1
