"""Sampling semantics through the whole stack: greedy, seed, max_tokens, stop, conversations."""

import pytest

from chat.v1 import chat_pb2, chat_pb2_grpc
from tests.integration.stack import chat_request, stream_text

COUNT = 'Count to 10.  Your response must begin with "1, ".  example: 1, 2, 3, ...'


def test_greedy_decoding_is_deterministic(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    request = chat_request("Tell me about cats.", max_tokens=16, temperature=0)
    texts = {stub.ChatCompletion(request).choices[0].message.content for _ in range(2)}
    assert len(texts) == 1


def test_same_seed_gives_the_same_output_and_another_seed_differs(
    stub: chat_pb2_grpc.ChatServiceStub,
) -> None:
    def sample(seed: int) -> str:
        request = chat_request("Write a creative name for a dog.", max_tokens=16, temperature=1.5, seed=seed)
        return stub.ChatCompletion(request).choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1


def test_top_p_near_zero_is_greedy(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    greedy = stub.ChatCompletion(chat_request("Tell me about dogs.", max_tokens=12, temperature=0))
    nucleus = stub.ChatCompletion(
        chat_request("Tell me about dogs.", max_tokens=12, temperature=1.5, top_p=1e-6)
    )
    assert nucleus.choices[0].message.content == greedy.choices[0].message.content


def test_max_tokens_ends_with_finish_reason_length(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    reply = stub.ChatCompletion(
        chat_request("Write a long story about the sea.", max_tokens=5, temperature=0)
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


@pytest.mark.parametrize("stop", [[", 6"], [", 6", ", six", ", Six"], ["5"]])
def test_stop_sequence_ends_output_before_it(stub: chat_pb2_grpc.ChatServiceStub, stop: list[str]) -> None:
    reply = stub.ChatCompletion(chat_request(COUNT, max_tokens=40, temperature=0, stop=stop))
    content = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert content.startswith("1, 2")
    assert not any(s in content for s in stop)


def test_stop_sequence_spanning_tokens_never_reaches_the_stream(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    # ", 6" is three tokens here (",", " ", "6"): the first two must be held back, then dropped.
    unstopped = (
        stub.ChatCompletion(chat_request(COUNT, max_tokens=24, temperature=0)).choices[0].message.content
    )
    assert ", 6" in unstopped
    chunks = list(stub.StreamChatCompletion(chat_request(COUNT, max_tokens=24, temperature=0, stop=[", 6"])))
    text = stream_text(chunks)
    assert text == unstopped[: unstopped.index(", 6")]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_multi_turn_conversation_uses_the_earlier_turns(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    messages = [
        chat_pb2.ChatMessage(role="system", content="You are a helpful assistant."),
        chat_pb2.ChatMessage(role="user", content="My name is Zorblax."),
        chat_pb2.ChatMessage(role="assistant", content="Nice to meet you, Zorblax!"),
        chat_pb2.ChatMessage(role="user", content="What is my name?"),
    ]
    reply = stub.ChatCompletion(chat_request(messages=messages, max_tokens=16, temperature=0))
    single = stub.ChatCompletion(chat_request("What is my name?", max_tokens=16, temperature=0))
    assert reply.usage.prompt_tokens > single.usage.prompt_tokens + 15
    assert "Zorblax" in reply.choices[0].message.content


def test_name_reaches_the_prompt(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    named = [chat_pb2.ChatMessage(role="user", content="Hello there.", name="Ada")]
    plain = [chat_pb2.ChatMessage(role="user", content="Hello there.")]
    with_name = stub.ChatCompletion(chat_request(messages=named, max_tokens=1))
    without = stub.ChatCompletion(chat_request(messages=plain, max_tokens=1))
    assert with_name.usage.prompt_tokens > without.usage.prompt_tokens


def test_stream_text_matches_completion_tokens(stub: chat_pb2_grpc.ChatServiceStub) -> None:
    chunks = list(stub.StreamChatCompletion(chat_request("Describe the moon.", max_tokens=20, temperature=0)))
    assert chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len(stream_text(chunks)) > 20
