"""Response objects, with the attribute names of the reference SDK."""

from dataclasses import dataclass

from chat.v1 import chat_pb2


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    queue_time: float
    prompt_time: float
    completion_time: float
    total_time: float

    @classmethod
    def from_proto(cls, usage: chat_pb2.Usage) -> "Usage":
        return cls(
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens,
            usage.queue_time,
            usage.prompt_time,
            usage.completion_time,
            usage.total_time,
        )


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: list[int]


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]  # the token's UTF-8 bytes
    top_logprobs: list[TopLogprob]  # the most likely tokens at its position, most likely first


@dataclass(frozen=True)
class ChoiceLogprobs:
    content: list[TokenLogprob]  # one per generated token

    @classmethod
    def from_proto(cls, choice: chat_pb2.Choice | chat_pb2.ChunkChoice) -> "ChoiceLogprobs | None":
        """None where the request did not ask for logprobs (or a chunk carries no tokens)."""
        if not choice.HasField("logprobs"):
            return None
        return cls(
            [
                TokenLogprob(
                    t.token,
                    t.logprob,
                    list(t.bytes),
                    [TopLogprob(top.token, top.logprob, list(top.bytes)) for top in t.top_logprobs],
                )
                for t in choice.logprobs.content
            ]
        )


@dataclass(frozen=True)
class FunctionCall:
    name: str
    arguments: str  # JSON text of an object


@dataclass(frozen=True)
class ToolCall:
    id: str
    type: str
    function: FunctionCall

    @classmethod
    def from_proto(cls, call: chat_pb2.ToolCall | chat_pb2.ToolCallDelta) -> "ToolCall":
        return cls(call.id, call.type, FunctionCall(call.function.name, call.function.arguments))


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    # The tools the model called (finish_reason "tool_calls"); None when it called none.
    tool_calls: list[ToolCall] | None = None


@dataclass(frozen=True)
class Choice:
    index: int
    message: Message
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


@dataclass(frozen=True)
class ChatCompletion:
    id: str
    object: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str
    service_tier: str = ""

    @classmethod
    def from_proto(cls, r: chat_pb2.ChatCompletionResponse) -> "ChatCompletion":
        choices = [
            Choice(
                c.index,
                Message(
                    c.message.role,
                    c.message.content,
                    [ToolCall.from_proto(t) for t in c.message.tool_calls] or None,
                ),
                c.finish_reason,
                ChoiceLogprobs.from_proto(c),
            )
            for c in r.choices
        ]
        usage = Usage.from_proto(r.usage)
        return cls(r.id, r.object, r.created, r.model, choices, usage, r.system_fingerprint, r.service_tier)


@dataclass(frozen=True)
class ToolCallDelta:
    index: int  # the call's position among the reply's calls
    id: str
    type: str
    function: FunctionCall


@dataclass(frozen=True)
class Delta:
    role: str | None
    content: str  # "" on the role and final chunks, so `print(delta.content, end="")` prints cleanly
    tool_calls: list[ToolCallDelta] | None = None  # each call whole, once


@dataclass(frozen=True)
class ChunkChoice:
    index: int
    delta: Delta
    finish_reason: str | None  # None until the last chunk
    logprobs: ChoiceLogprobs | None = None


@dataclass(frozen=True)
class ChatCompletionChunk:
    id: str
    object: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None  # on the last chunk only
    system_fingerprint: str
    # Grows along the stream (not by one); the clients resume a dropped stream after the last one seen.
    sequence_number: int = 0
    service_tier: str = ""

    @classmethod
    def from_proto(cls, c: chat_pb2.ChatCompletionChunk) -> "ChatCompletionChunk":
        choices = [
            ChunkChoice(
                ch.index,
                Delta(
                    ch.delta.role if ch.delta.HasField("role") else None,
                    ch.delta.content,
                    [
                        ToolCallDelta(
                            t.index, t.id, t.type, FunctionCall(t.function.name, t.function.arguments)
                        )
                        for t in ch.delta.tool_calls
                    ]
                    or None,
                ),
                ch.finish_reason or None,
                ChoiceLogprobs.from_proto(ch),
            )
            for ch in c.choices
        ]
        usage = Usage.from_proto(c.usage) if c.HasField("usage") else None
        return cls(
            c.id,
            c.object,
            c.created,
            c.model,
            choices,
            usage,
            c.system_fingerprint,
            c.sequence_number,
            c.service_tier,
        )


@dataclass(frozen=True)
class Model:
    id: str
    object: str
    created: int
    owned_by: str
    context_window: int
