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
from google.rpc import code_pb2
from grpc_status import rpc_status

from chat.v1 import chat_pb2, chat_pb2_grpc
from common import codec
from gateway import metrics
from gateway.auth import Authenticator
from gateway.catalog import ModelCatalog
from gateway.config import GatewaySettings
from gateway.errors import (
    Aborted,
    DeadlineExceeded,
    InvalidField,
    MalformedRequest,
    PermissionDenied,
    QueueFull,
    RateLimited,
    ServiceError,
    TooManyCalls,
    Unauthenticated,
    Unavailable,
    from_failed_event,
)
from gateway.metrics import CallRecorder
from gateway.queue import JobQueue
from gateway.ratelimit import Budget, RateLimiter
from gateway.resume import StreamedText
from gateway.subscription import Subscription
from gateway.validation import Limits, validate
from gateway.wire import Undecodable

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
    def __init__(
        self,
        settings: GatewaySettings,
        catalog: ModelCatalog,
        queue: JobQueue,
        authenticator: Authenticator | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self._settings = settings
        self._catalog = catalog
        self._queue = queue
        self._authenticator = authenticator  # None: GATEWAY_AUTH=off
        self._rate_limiter = rate_limiter
        self.open_calls = 0
        self._limits = Limits(settings.max_messages, settings.max_prompt_chars)

    async def ChatCompletion(
        self, request: chat_pb2.ChatCompletionRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> chat_pb2.ChatCompletionResponse:
        recorder = self._recorder("ChatCompletion", request)
        pieces: list[str] = []
        code = "OK"
        try:
            async with aclosing(self._relay(request, context, recorder)) as events:
                async for call, event in events:
                    if event.HasField("started"):
                        pieces.clear()  # a re-run on another worker starts over
                    elif event.HasField("delta"):
                        pieces.append(event.delta.text)
                    elif event.HasField("finished"):
                        return _response(call, "".join(pieces), event.finished)
            raise ServiceError("the job ended without a result")
        except ServiceError as exc:
            code = code_pb2.Code.Name(exc.code)
            await _abort(context, exc)
            raise AssertionError("unreachable") from exc  # abort always raises
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            recorder.done(code)

    async def StreamChatCompletion(
        self, request: chat_pb2.ChatCompletionRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        recorder = self._recorder("StreamChatCompletion", request)
        streamed = StreamedText()
        role_sent = False
        code = "OK"
        try:
            async with aclosing(self._relay(request, context, recorder)) as events:
                async for call, event in events:
                    kind = event.WhichOneof("kind")
                    if kind == "started":
                        if event.attempt > 1:
                            metrics.RESUMED_STREAMS.labels(recorder.model, "rerun").inc()
                        streamed.restart()
                        if not role_sent:
                            role_sent = True
                            yield _chunk(call, chat_pb2.Delta(role="assistant"))
                    elif kind == "delta":
                        if text := streamed.forward(event.delta.text, event.delta.completion_tokens):
                            yield _chunk(call, chat_pb2.Delta(content=text))
                    elif kind == "finished":
                        streamed.check_finished()
                        usage = _usage(event.finished)
                        yield _chunk(call, chat_pb2.Delta(), event.finished.finish_reason, usage)
                        return
            raise ServiceError("the job ended without a result")
        except ServiceError as exc:
            code = code_pb2.Code.Name(exc.code)
            if isinstance(exc, Aborted):
                metrics.RESUMED_STREAMS.labels(recorder.model, "aborted").inc()
            await _abort(context, exc)
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        finally:
            recorder.done(code)

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

    def _recorder(self, rpc: str, request: chat_pb2.ChatCompletionRequest | Undecodable) -> CallRecorder:
        model = request.model if isinstance(request, chat_pb2.ChatCompletionRequest) else ""
        return CallRecorder(rpc, metrics.model_label(model, self._catalog.names))

    async def _relay(
        self,
        request: chat_pb2.ChatCompletionRequest | Undecodable,
        context: grpc.aio.ServicerContext,
        recorder: CallRecorder,
    ) -> AsyncGenerator[tuple[_Call, codec.Event]]:
        """Validates, queues, and yields the job's events up to Finished; raises ServiceError on failure."""
        timeout = self._timeout(context)
        deadline = time.time() + timeout
        subscription, budget = await self._admit(request, context, deadline, recorder)
        if budget is not None:
            await context.send_initial_metadata(budget.metadata())
        call = _Call(subscription.request_id, int(time.time()), subscription.model)
        finished = False
        completion_tokens = 0
        self.open_calls += 1
        metrics.OPEN_CALLS.inc()
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
                    elif kind == "delta":
                        recorder.delta()
                    elif kind == "finished":
                        finished = True
                        f = event.finished
                        completion_tokens = f.completion_tokens
                        recorder.finished(f.prompt_tokens, f.completion_tokens, f.queue_time)
                    yield call, event
        except TimeoutError:
            raise DeadlineExceeded(
                f"deadline of {timeout:.1f}s passed before the completion finished"
            ) from None
        finally:
            self.open_calls -= 1
            metrics.OPEN_CALLS.dec()
            self._queue.release(subscription, cancel_until=None if finished else deadline)
            if budget is not None and self._rate_limiter is not None:
                # Calls that did not finish are charged their whole reservation.
                unused = subscription.max_tokens - completion_tokens if finished else 0
                await self._rate_limiter.refund(budget, unused)

    async def _admit(
        self,
        request: chat_pb2.ChatCompletionRequest | Undecodable,
        context: grpc.aio.ServicerContext,
        deadline: float,
        recorder: CallRecorder,
    ) -> tuple[Subscription, Budget | None]:
        """Everything that may refuse a call before its job exists: caller, limits, validation, capacity."""
        try:
            if isinstance(request, Undecodable):
                raise MalformedRequest(f"the request is not a valid {request.message_type}: {request.error}")
            record = None
            if self._authenticator is not None:
                record = await self._authenticator.authenticate(
                    context.invocation_metadata() or (), request.model
                )
            if self.open_calls >= self._settings.max_concurrent_calls:
                raise TooManyCalls(self._settings.max_concurrent_calls)
            valid = validate(request, self._catalog, self._settings.default_max_tokens, self._limits)
            budget = None
            if record is not None and self._rate_limiter is not None:
                budget = await self._rate_limiter.admit(
                    record, len(valid.prompt_token_ids) + valid.max_tokens
                )
            return await self._queue.submit(valid, deadline), budget
        except ServiceError as exc:
            metrics.REJECTIONS.labels(recorder.model, _rejection_reason(exc)).inc()
            raise

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        default = self._settings.default_timeout_seconds
        return default if remaining is None else max(0.0, min(remaining, default))


def _rejection_reason(error: ServiceError) -> str:
    reasons: list[tuple[type[ServiceError], str]] = [
        (InvalidField, "invalid"),
        (Unauthenticated, "unauthenticated"),
        (PermissionDenied, "permission_denied"),
        (RateLimited, "rate_limited"),
        (MalformedRequest, "invalid"),
        (QueueFull, "queue_full"),
        (TooManyCalls, "too_many_calls"),
        (Unavailable, "redis_unavailable"),
    ]
    return next((reason for kind, reason in reasons if isinstance(error, kind)), "other")


def _response(call: _Call, content: str, finished: codec.Finished) -> chat_pb2.ChatCompletionResponse:
    choice = chat_pb2.Choice(
        index=0,
        message=chat_pb2.AssistantMessage(role="assistant", content=content),
        finish_reason=finished.finish_reason,
    )
    return chat_pb2.ChatCompletionResponse(
        id=call.completion_id,
        object="chat.completion",
        created=call.created,
        model=call.model,
        choices=[choice],
        usage=_usage(finished),
        system_fingerprint=call.fingerprint,
    )


def _chunk(
    call: _Call, delta: chat_pb2.Delta, finish_reason: str = "", usage: chat_pb2.Usage | None = None
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
    if error.code == code_pb2.INTERNAL:
        log.error("internal error: %s", error.message)
    status = rpc_status.to_status(error.to_status())
    if error.metadata:
        status = status._replace(trailing_metadata=(*status.trailing_metadata, *error.metadata))
    await context.abort_with_status(status)
