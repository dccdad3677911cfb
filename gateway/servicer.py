"""chat.v1.ChatService: validate -> submit -> relay.

Unary and streaming calls share one path (`_relay`); they differ only in how they
present its output. When a call ends for any reason other than its job finishing
(caller cancelled or disconnected, deadline, error), the job is cancelled so no
worker keeps generating for nobody.
"""

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import grpc
from grpc_status import rpc_status

from chat.v1 import chat_pb2, chat_pb2_grpc
from common import codec
from gateway.catalog import ModelCatalog
from gateway.config import GatewaySettings
from gateway.errors import DeadlineExceeded, ServiceError, TooManyCalls, from_failed_event
from gateway.queue import JobQueue
from gateway.resume import StreamedText
from gateway.validation import ValidRequest, validate

log = logging.getLogger(__name__)


@dataclass
class _Call:
    """What every response of one call shares."""

    request_id: str
    created: int
    model: str
    fingerprint: str = ""

    @property
    def completion_id(self) -> str:
        return f"chatcmpl-{self.request_id}"


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, settings: GatewaySettings, catalog: ModelCatalog, queue: JobQueue) -> None:
        self._settings = settings
        self._catalog = catalog
        self._queue = queue
        self.open_calls = 0

    async def ChatCompletion(
        self, request: chat_pb2.ChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.ChatCompletionResponse:
        pieces: list[str] = []
        try:
            async with aclosing(self._relay(request, context)) as events:
                async for call, event in events:
                    if event.HasField("started"):
                        pieces.clear()  # a re-run on another worker starts over
                    elif event.HasField("delta"):
                        pieces.append(event.delta.text)
                    elif event.HasField("finished"):
                        choice = chat_pb2.Choice(
                            index=0,
                            message=chat_pb2.AssistantMessage(role="assistant", content="".join(pieces)),
                            finish_reason=event.finished.finish_reason,
                        )
                        return chat_pb2.ChatCompletionResponse(
                            id=call.completion_id,
                            object="chat.completion",
                            created=call.created,
                            model=call.model,
                            choices=[choice],
                            usage=_usage(event.finished),
                            system_fingerprint=call.fingerprint,
                        )
        except ServiceError as exc:
            await _abort(context, exc)
        await _abort(context, ServiceError("the job ended without a result"))
        raise AssertionError("unreachable")  # abort always raises

    async def StreamChatCompletion(
        self, request: chat_pb2.ChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        streamed = StreamedText()
        role_sent = False
        try:
            async with aclosing(self._relay(request, context)) as events:
                async for call, event in events:
                    kind = event.WhichOneof("kind")
                    if kind == "started":
                        streamed.restart()
                        if not role_sent:
                            role_sent = True
                            yield _chunk(call, chat_pb2.Delta(role="assistant"))
                    elif kind == "delta":
                        if text := streamed.forward(event.delta.text, event.delta.completion_tokens):
                            yield _chunk(call, chat_pb2.Delta(content=text))
                    elif kind == "finished":
                        streamed.check_finished()
                        yield _chunk(
                            call,
                            chat_pb2.Delta(),
                            event.finished.finish_reason,
                            _usage(event.finished),
                        )
                        return
        except ServiceError as exc:
            await _abort(context, exc)
        await _abort(context, ServiceError("the job ended without a result"))

    async def ListModels(
        self, request: chat_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.ListModelsResponse:
        models = [
            chat_pb2.Model(
                id=m.name,
                object="model",
                created=m.created,
                owned_by="chat-service",
                context_window=m.context_window,
            )
            for m in self._catalog
        ]
        return chat_pb2.ListModelsResponse(object="list", data=models)

    async def _relay(
        self, request: chat_pb2.ChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[tuple[_Call, codec.Event]]:
        """Validates, queues, and yields the job's events up to Finished; raises ServiceError on failure."""
        if self.open_calls >= self._settings.max_concurrent_calls:
            raise TooManyCalls(self._settings.max_concurrent_calls)
        valid: ValidRequest = validate(request, self._catalog, self._settings.default_max_tokens)
        timeout = self._timeout(context)
        deadline = time.time() + timeout
        subscription = await self._queue.submit(valid, deadline)
        call = _Call(subscription.request_id, int(time.time()), valid.model)
        finished = False
        self.open_calls += 1
        try:
            async with asyncio.timeout(timeout):
                while not finished:
                    event = await subscription.next()
                    kind = event.WhichOneof("kind")
                    if kind == "failed":
                        finished = True  # the worker has already let go of the job
                        raise from_failed_event(event.failed)
                    if kind == "started":
                        call.fingerprint = event.started.system_fingerprint
                    finished = kind == "finished"
                    yield call, event
        except TimeoutError:
            raise DeadlineExceeded(
                f"deadline of {timeout:.1f}s passed before the completion finished"
            ) from None
        finally:
            self.open_calls -= 1
            self._queue.release(subscription.request_id, cancel_until=None if finished else deadline)

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        default = self._settings.default_timeout_seconds
        return default if remaining is None else max(0.0, min(remaining, default))


def _chunk(
    call: _Call,
    delta: chat_pb2.Delta,
    finish_reason: str = "",
    usage: chat_pb2.Usage | None = None,
) -> chat_pb2.ChatCompletionChunk:
    return chat_pb2.ChatCompletionChunk(
        id=call.completion_id,
        object="chat.completion.chunk",
        created=call.created,
        model=call.model,
        choices=[chat_pb2.ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)],
        usage=usage,
        system_fingerprint=call.fingerprint,
    )


def _usage(finished: codec.Finished) -> chat_pb2.Usage:
    return chat_pb2.Usage(
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
        queue_time=finished.queue_time,
        prompt_time=finished.prompt_time,
        completion_time=finished.completion_time,
        total_time=finished.prompt_time + finished.completion_time,
    )


async def _abort(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    if error.code == grpc.StatusCode.INTERNAL.value[0]:
        log.error("internal error: %s", error.message)
    await context.abort_with_status(rpc_status.to_status(error.to_status()))
