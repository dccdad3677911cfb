"""chat.v1.ChatService: the gRPC adapter over gateway/relay.py.

Each RPC hands the request to Relay.run (Relay.resume for ResumeChatCompletion and
GetChatCompletion) and turns its items into protobuf responses, and a Failed item into a
gRPC status with rich details (gateway/errors.py).
"""

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing

import grpc
from google.rpc import code_pb2
from grpc_status import rpc_status

from chat.v1 import chat_pb2, chat_pb2_grpc
from common import codec
from gateway.access import ModelDirectory
from gateway.errors import MalformedRequest, ServiceError
from gateway.relay import Accepted, Caller, Failed, Finished, Item, Relay, Started, Text, Usage
from gateway.resume import ChoiceReply
from gateway.wire import Undecodable

log = logging.getLogger(__name__)

_NO_RESULT = "the job ended without a result"


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, relay: Relay, directory: ModelDirectory) -> None:
        self._relay = relay
        self._directory = directory

    async def ChatCompletion(
        self, request: chat_pb2.ChatCompletionRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> chat_pb2.ChatCompletionResponse:
        items = self._relay.run(request, _caller(context), stream=False)
        response = await _response(items, context, whole=True)
        assert response is not None
        return response

    async def StreamChatCompletion(
        self, request: chat_pb2.ChatCompletionRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        async for chunk in _chunks(self._relay.run(request, _caller(context), stream=True), context):
            yield chunk

    async def ResumeChatCompletion(
        self, request: chat_pb2.ResumeChatCompletionRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        if isinstance(request, Undecodable):
            await _abort(context, MalformedRequest(f"the request is not a valid {request.message_type}"))
            return
        after = request.starting_after if request.HasField("starting_after") else -1
        async for chunk in _chunks(self._relay.resume(request.id, _caller(context), after), context):
            yield chunk

    async def GetChatCompletion(
        self, request: chat_pb2.GetChatCompletionRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> chat_pb2.ChatCompletionResponse:
        if isinstance(request, Undecodable):
            await _abort(context, MalformedRequest(f"the request is not a valid {request.message_type}"))
            raise AssertionError("unreachable")  # abort always raises
        items = self._relay.resume(request.id, _caller(context), follow=False)
        response = await _response(items, context, whole=False)
        assert response is not None
        return response

    async def ListModels(
        self, request: chat_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.ListModelsResponse:
        try:
            visible = await self._directory.visible(context.invocation_metadata() or ())
        except ServiceError as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable") from exc  # abort always raises
        models = [
            chat_pb2.Model(
                id=m.name,
                object="model",
                created=m.created,
                owned_by="chat-service",
                context_window=m.context_window,
                supports_tools=m.supports_tools,
            )
            for m in visible
        ]
        return chat_pb2.ListModelsResponse(object="list", data=models)


def _caller(context: grpc.aio.ServicerContext) -> Caller:
    return Caller(context.invocation_metadata() or (), context.time_remaining())


async def _send_budget(context: grpc.aio.ServicerContext, call: Accepted) -> None:
    if call.ratelimit:
        await context.send_initial_metadata(call.ratelimit)


async def _response(
    items: AsyncGenerator[Item], context: grpc.aio.ServicerContext, whole: bool
) -> chat_pb2.ChatCompletionResponse | None:
    """The items of a call as one response. whole: the completion must have finished; else what
    came so far will do (finish_reason empty, no usage)."""
    call: Accepted | None = None
    replies: dict[int, ChoiceReply] = {}
    fingerprint = ""
    async with aclosing(items):
        async for item in items:
            if isinstance(item, Accepted):
                call = item
                await _send_budget(context, item)
            elif isinstance(item, Started):
                fingerprint = item.system_fingerprint
            elif isinstance(item, Text):
                replies.setdefault(item.index, ChoiceReply()).add(item.text, item.logprobs, item.tool_calls)
            elif isinstance(item, Finished) and call is not None:
                return _completion(call, replies, item.system_fingerprint, item)
            elif isinstance(item, Failed):
                await _abort(context, item.error)
    if call is not None and not whole:
        return _completion(call, replies, fingerprint, None)
    await _abort(context, ServiceError(_NO_RESULT))
    raise AssertionError("unreachable")  # abort always raises


async def _chunks(
    items: AsyncGenerator[Item], context: grpc.aio.ServicerContext
) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
    """The items of a call as stream chunks, each with the sequence number to resume after it."""
    call: Accepted | None = None
    fingerprint = ""
    async with aclosing(items):
        async for item in items:
            if isinstance(item, Accepted):
                call = item
                await _send_budget(context, item)
            elif isinstance(item, Failed):
                await _abort(context, item.error)
            elif call is None:
                break
            elif isinstance(item, Started):
                fingerprint = item.system_fingerprint
                if item.replayed:
                    continue
                role = chat_pb2.Delta(role="assistant")
                yield _chunk(
                    call, fingerprint, item.seq, [_chunk_choice(i, role) for i in range(call.choices)]
                )
            elif isinstance(item, Text):
                delta = chat_pb2.Delta(tool_calls=_tool_call_deltas(item.tool_calls))
                if item.text or not item.tool_calls:
                    delta.content = item.text
                text = _chunk_choice(item.index, delta, logprobs=item.logprobs)
                yield _chunk(call, fingerprint, item.seq, [text])
            elif isinstance(item, Finished) and item.replayed:
                return  # a resume after the last chunk: nothing left to send
            elif isinstance(item, Finished):
                fingerprint = item.system_fingerprint
                ends = [
                    _chunk_choice(i, chat_pb2.Delta(), item.finish_reason_of(i)) for i in range(call.choices)
                ]
                yield _chunk(call, fingerprint, item.seq, ends, _usage(item.usage))
                return
    await _abort(context, ServiceError(_NO_RESULT))


def _completion(
    call: Accepted, replies: dict[int, ChoiceReply], fingerprint: str, finished: Finished | None
) -> chat_pb2.ChatCompletionResponse:
    """The response; without `finished`, as far as it has come (finish_reason empty, no usage)."""
    choices = []
    for index in range(call.choices):
        reply = replies.get(index, ChoiceReply())
        choice = chat_pb2.Choice(
            index=index,
            message=chat_pb2.AssistantMessage(
                role="assistant", content=reply.text, tool_calls=map(_tool_call, reply.tool_calls)
            ),
            finish_reason=finished.finish_reason_of(index) if finished is not None else "",
            logprobs=_logprobs(reply.logprobs),
        )
        choices.append(choice)
    return chat_pb2.ChatCompletionResponse(
        id=call.completion_id,
        object="chat.completion",
        created=call.created,
        model=call.model,
        choices=choices,
        usage=_usage(finished.usage) if finished is not None else None,
        system_fingerprint=fingerprint,
        service_tier=call.service_tier,
    )


def _tool_call(call: codec.ToolCall) -> chat_pb2.ToolCall:
    function = chat_pb2.FunctionCall(name=call.name, arguments=call.arguments)
    return chat_pb2.ToolCall(id=call.id, type="function", function=function)


def _tool_call_deltas(calls: Sequence[codec.ToolCall]) -> list[chat_pb2.ToolCallDelta]:
    return [
        chat_pb2.ToolCallDelta(
            index=i,
            id=c.id,
            type="function",
            function=chat_pb2.FunctionCall(name=c.name, arguments=c.arguments),
        )
        for i, c in enumerate(calls)
    ]


def _chunk_choice(
    index: int, delta: chat_pb2.Delta, finish_reason: str = "", logprobs: Sequence[codec.TokenLogprob] = ()
) -> chat_pb2.ChunkChoice:
    return chat_pb2.ChunkChoice(
        index=index, delta=delta, finish_reason=finish_reason, logprobs=_logprobs(logprobs)
    )


def _chunk(
    call: Accepted,
    fingerprint: str,
    seq: int,
    choices: list[chat_pb2.ChunkChoice],
    usage: chat_pb2.Usage | None = None,
) -> chat_pb2.ChatCompletionChunk:
    return chat_pb2.ChatCompletionChunk(
        id=call.completion_id,
        object="chat.completion.chunk",
        created=call.created,
        model=call.model,
        choices=choices,
        usage=usage,
        system_fingerprint=fingerprint,
        service_tier=call.service_tier,
        sequence_number=seq,
    )


def _logprobs(entries: Sequence[codec.TokenLogprob]) -> chat_pb2.ChoiceLogprobs | None:
    """The entries in the public shape; None (the field unset) where logprobs were not asked for."""
    if not entries:
        return None
    return chat_pb2.ChoiceLogprobs(content=[_token_logprob(entry) for entry in entries])


def _token_logprob(entry: codec.TokenLogprob) -> chat_pb2.TokenLogprob:
    return chat_pb2.TokenLogprob(
        token=entry.token,
        logprob=entry.logprob,
        bytes=entry.token.encode(),
        top_logprobs=[_token_logprob(top) for top in entry.top_logprobs],
    )


def _usage(usage: Usage) -> chat_pb2.Usage:
    return chat_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        queue_time=usage.queue_time,
        prompt_time=usage.prompt_time,
        completion_time=usage.completion_time,
        total_time=usage.total_time,
    )


async def _abort(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    if error.code == code_pb2.INTERNAL:
        log.error("internal error: %s", error.message)
    status = rpc_status.to_status(error.to_status())
    if error.metadata:
        status = status._replace(trailing_metadata=(*status.trailing_metadata, *error.metadata))
    await context.abort_with_status(status)
