"""n > 1 choices through the whole stack on vLLM: gRPC, the Python client and both SDKs.

One job generates all choices. Seeded, each choice is reproducible, so a stream and a unary
call with the same seed give the same choices; logprobs count each choice's tokens, and
usage.completion_tokens is their sum.
"""

from typing import Any

import groq
import openai
import pytest

from chat.v1 import chat_pb2, chat_pb2_grpc
from chat_client import Client
from tests.integration.stack import MODEL, Stack, chat_request

STORY = [{"role": "user", "content": "Tell me a story."}]
ARGS: dict[str, Any] = {"model": MODEL, "max_tokens": 8, "temperature": 1.0, "seed": 7, "n": 3}


def test_grpc_unary_and_stream_give_the_same_seeded_choices(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    request = chat_request("Tell me a story.", max_tokens=8, temperature=1.0, seed=7, n=3, logprobs=True)
    response = stub.ChatCompletion(request, timeout=60)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in response.choices)
    texts = [c.message.content for c in response.choices]
    assert len(set(texts)) > 1  # each choice is sampled on its own
    # One logprob per token: the choices' tokens add up to usage.
    assert sum(len(c.logprobs.content) for c in response.choices) == response.usage.completion_tokens

    chunks = list(stub.StreamChatCompletion(request, timeout=60))
    first, last = chunks[0], chunks[-1]
    assert [(c.index, c.delta.role) for c in first.choices] == [
        (0, "assistant"),
        (1, "assistant"),
        (2, "assistant"),
    ]
    assert [(c.index, c.finish_reason) for c in last.choices] == [
        (c.index, c.finish_reason) for c in response.choices
    ]
    streamed = ["".join(c.delta.content for k in chunks for c in k.choices if c.index == i) for i in range(3)]
    assert streamed == texts
    assert last.usage.completion_tokens == response.usage.completion_tokens

    again = stub.GetChatCompletion(chat_pb2.GetChatCompletionRequest(id=first.id), timeout=30)
    assert [c.message.content for c in again.choices] == texts


def test_the_python_client_returns_every_choice(stack: Stack, stub: chat_pb2_grpc.ChatServiceStub) -> None:
    with Client(stack.address) as client:
        reply = client.chat.completions.create(messages=STORY, **ARGS)
    expected = stub.ChatCompletion(
        chat_request("Tell me a story.", max_tokens=8, temperature=1.0, seed=7, n=3)
    )
    assert [c.message.content for c in reply.choices] == [c.message.content for c in expected.choices]


@pytest.mark.parametrize("sdk", ["openai", "groq"])
def test_both_sdks_get_n_choices_unary_and_streamed(
    sdk: str, openai_client: openai.OpenAI, groq_client: groq.Groq
) -> None:
    client: Any = openai_client if sdk == "openai" else groq_client
    reply = client.chat.completions.create(messages=STORY, **ARGS)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    stream = client.chat.completions.create(messages=STORY, stream=True, **ARGS)
    pieces: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            pieces[choice.index] = pieces.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert [pieces[i] for i in range(3)] == texts
    assert [finish[i] for i in range(3)] == [c.finish_reason for c in reply.choices]


def test_greedy_n_choices_are_the_same_reply(openai_client: openai.OpenAI) -> None:
    # vLLM refuses n > 1 with greedy decoding; the worker generates once and gives it to each.
    args = {**ARGS, "temperature": 0, "seed": None}
    reply = openai_client.chat.completions.create(messages=STORY, **args)
    one = openai_client.chat.completions.create(messages=STORY, **{**args, "n": 1})
    assert [c.message.content for c in reply.choices] == [one.choices[0].message.content] * 3
    assert reply.usage is not None and one.usage is not None
    assert reply.usage.completion_tokens == 3 * one.usage.completion_tokens


@pytest.mark.parametrize("sdk", ["openai", "groq"])
def test_the_sdks_service_tier_auto_is_served_on_demand(
    sdk: str, openai_client: openai.OpenAI, groq_client: groq.Groq, stub: chat_pb2_grpc.ChatServiceStub
) -> None:
    client: Any = openai_client if sdk == "openai" else groq_client
    reply = client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=2, service_tier="auto")
    assert reply.service_tier == "on_demand"
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=STORY, max_tokens=2, service_tier="on_demand", stream=True
        )
    )
    assert {c.service_tier for c in chunks} == {"on_demand"}
    response = stub.ChatCompletion(chat_request("Hi", max_tokens=2, service_tier="auto"), timeout=60)
    assert response.service_tier == "on_demand"


@pytest.mark.parametrize("sdk", ["openai", "groq"])
def test_a_flex_request_is_served_in_the_flex_lane_and_says_so(
    sdk: str, openai_client: openai.OpenAI, groq_client: groq.Groq, stub: chat_pb2_grpc.ChatServiceStub
) -> None:
    client: Any = openai_client if sdk == "openai" else groq_client
    args = {"model": MODEL, "messages": STORY, "max_tokens": 4, "temperature": 0}
    on_demand = client.chat.completions.create(**args)
    reply = client.chat.completions.create(**args, service_tier="flex")
    assert reply.service_tier == "flex"
    # The same engine, at a lower priority: the same greedy text.
    assert reply.choices[0].message.content == on_demand.choices[0].message.content
    chunks = list(client.chat.completions.create(**args, service_tier="flex", stream=True))
    assert {c.service_tier for c in chunks} == {"flex"}
    response = stub.ChatCompletion(chat_request("Hi", max_tokens=2, service_tier="flex"), timeout=60)
    assert response.service_tier == "flex" and response.choices[0].finish_reason == "length"
