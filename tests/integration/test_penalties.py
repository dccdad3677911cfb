"""frequency_penalty and presence_penalty through the whole stack, on gRPC and over HTTP.

Greedy SmolLM2 asked to count to 10 counts on past it ("1, 2, ..., 10, 1"): the "," token
10 times in 32 tokens. Penalized, it soon stops repeating itself ("1, 2, 3, ..." in float32
and bfloat16 alike). The checks compare replies with and without a penalty, so they need
the real model; a penalty that got lost on the way would leave the reply as it was.
"""

import functools
from collections import Counter

import groq
import openai
import pytest

from chat.v1 import chat_pb2_grpc
from common.models import ModelSpec, PromptRenderer
from tests.integration.stack import MODEL, chat_request

COUNT = 'Count to 10.  Your response must begin with "1, ".  example: 1, 2, 3, ...'
PENALTIES = ["frequency_penalty", "presence_penalty"]


@functools.cache
def renderer() -> PromptRenderer:
    return PromptRenderer(ModelSpec.parse(MODEL))


def most_repeats(text: str) -> int:
    """How often the most frequent token of the text occurs in it."""
    ids = renderer().tokenizer(text, add_special_tokens=False)["input_ids"]
    return max(Counter(ids).values(), default=0)


def grpc_reply(stub: chat_pb2_grpc.ChatServiceStub, **penalty: float) -> str:
    request = chat_request(COUNT, max_tokens=32, temperature=0, **penalty)
    return str(stub.ChatCompletion(request).choices[0].message.content)


@pytest.mark.parametrize("penalty", PENALTIES)
def test_a_penalty_reaches_the_engine_and_curbs_repetition(
    stub: chat_pb2_grpc.ChatServiceStub, penalty: str
) -> None:
    plain, penalized = grpc_reply(stub), grpc_reply(stub, **{penalty: 2.0})
    assert penalized != plain
    assert most_repeats(penalized) < most_repeats(plain)


def test_a_zero_penalty_is_no_penalty(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    assert grpc_reply(stub, frequency_penalty=0.0, presence_penalty=0.0) == grpc_reply(stub)


@pytest.mark.parametrize(("frequency", "presence"), [(2.0, None), (None, 2.0)])
def test_both_sdks_send_the_penalties_over_http(
    stub: chat_pb2_grpc.ChatServiceStub,
    openai_client: openai.OpenAI,
    groq_client: groq.Groq,
    frequency: float | None,
    presence: float | None,
) -> None:
    # The SDKs send the parameter left at None as null, which means not set.
    via_openai = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": COUNT}],
        max_tokens=32,
        temperature=0,
        frequency_penalty=frequency,
        presence_penalty=presence,
    )
    via_groq = groq_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": COUNT}],
        max_tokens=32,
        temperature=0,
        frequency_penalty=frequency,
        presence_penalty=presence,
    )
    # Greedy: the same reply as on gRPC, where the penalty is known to change it.
    penalty = {"frequency_penalty": frequency} if frequency is not None else {"presence_penalty": presence}
    expected = grpc_reply(stub, **penalty)
    assert via_openai.choices[0].message.content == via_groq.choices[0].message.content == expected
    assert expected != grpc_reply(stub)
