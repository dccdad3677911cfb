"""logprobs and top_logprobs through the whole stack on vLLM: gRPC, the Python client, both SDKs.

Greedy decoding, so every transport gets the same tokens; the checks hold for any model: one
entry per generated token (usage.completion_tokens of them), the tokens spell the reply, the
token generated is a likeliest at its position (of a tie, either), top_logprobs are ordered and
as many as asked.
"""

from typing import Any

import groq
import openai
import pytest

from chat.v1 import chat_pb2, chat_pb2_grpc
from chat_client import Client
from tests.integration.stack import MODEL, Stack, chat_request

ASK = "Name three colours."
MESSAGES: list[Any] = [{"role": "user", "content": ASK}]
MAX_TOKENS = 12


def check_entries(
    content: str, entries: list[Any], completion_tokens: int, top: int
) -> list[tuple[str, float]]:
    """Checks entries in the SDKs' shape; returns (token, logprob) pairs to compare across transports."""
    assert len(entries) == completion_tokens
    assert "".join(e.token for e in entries).startswith(content)
    for e in entries:
        assert e.logprob <= 0 and list(e.bytes) == list(e.token.encode())
        assert len(e.top_logprobs) == top
        assert [t.logprob for t in e.top_logprobs] == sorted(
            (t.logprob for t in e.top_logprobs), reverse=True
        )
        if top:
            # Greedy: the token generated is a likeliest one. Two can tie (bfloat16 logits often
            # do), and then either may be listed first.
            assert e.logprob == e.top_logprobs[0].logprob
            assert e.token in [t.token for t in e.top_logprobs if t.logprob == e.logprob]
    return pairs(entries)


def pairs(entries: Any) -> list[tuple[str, float]]:
    """(token, logprob) of each entry, rounded: what transports must agree on."""
    return [(e.token, round(e.logprob, 3)) for e in entries]


def grpc_unary(stub: chat_pb2_grpc.ChatServiceStub, top: int) -> chat_pb2.ChatCompletionResponse:
    request = chat_request(ASK, max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=top)
    return stub.ChatCompletion(request, timeout=60)


def test_grpc_unary_stream_and_get_return_the_same_logprobs(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    response = grpc_unary(stub, top=2)
    choice = response.choices[0]
    expected = check_entries(
        choice.message.content, list(choice.logprobs.content), response.usage.completion_tokens, top=2
    )
    request = chat_request(ASK, max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=2)
    chunks = list(stub.StreamChatCompletion(request, timeout=60))
    streamed = [e for c in chunks for e in c.choices[0].logprobs.content]
    assert pairs(streamed) == expected
    # Chunks without tokens (the role chunk, the last one) have no logprobs at all.
    assert not chunks[0].choices[0].HasField("logprobs") and not chunks[-1].choices[0].HasField("logprobs")
    # Read back by id from the completion log: the same entries.
    again = stub.GetChatCompletion(chat_pb2.GetChatCompletionRequest(id=chunks[0].id), timeout=30)
    assert pairs(again.choices[0].logprobs.content) == expected


def test_without_logprobs_the_field_is_unset(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    response = stub.ChatCompletion(chat_request(ASK, max_tokens=4, temperature=0), timeout=60)
    assert not response.choices[0].HasField("logprobs")
    zero = grpc_unary(stub, top=0)  # logprobs without top_logprobs: the tokens' own only
    check_entries(
        zero.choices[0].message.content,
        list(zero.choices[0].logprobs.content),
        zero.usage.completion_tokens,
        0,
    )


def test_the_python_client_returns_logprobs(stack: Stack, stub: chat_pb2_grpc.ChatServiceStub) -> None:
    with Client(stack.address) as client:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=MAX_TOKENS,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
        )
        chunks = list(
            client.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                max_tokens=MAX_TOKENS,
                temperature=0,
                logprobs=True,
                stream=True,
            )
        )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None
    expected = check_entries(
        reply.choices[0].message.content, logprobs.content, reply.usage.completion_tokens, 2
    )
    streamed = [e for c in chunks if (lp := c.choices[0].logprobs) is not None for e in lp.content]
    assert pairs(streamed) == expected


@pytest.mark.parametrize("sdk", ["openai", "groq"])
def test_both_sdks_get_logprobs_unary_and_streamed(
    sdk: str, openai_client: openai.OpenAI, groq_client: groq.Groq, stub: chat_pb2_grpc.ChatServiceStub
) -> None:
    client: Any = openai_client if sdk == "openai" else groq_client
    create = client.chat.completions.create
    reply = create(
        model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = reply.choices[0]
    expected = check_entries(
        choice.message.content, choice.logprobs.content, reply.usage.completion_tokens, 3
    )
    grpc_reply = grpc_unary(stub, top=3).choices[0].logprobs.content
    assert pairs(grpc_reply) == expected

    stream = create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    )
    chunks = list(stream)
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert pairs(streamed) == expected
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content

    plain = create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None
