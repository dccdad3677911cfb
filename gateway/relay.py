"""The one call path both transports share: admit -> submit -> relay -> cancel/refund.

`Relay.run` takes a public request and yields ready-made items: `Accepted` (the job is
queued), `Started` (a worker took it), `Text`, then exactly one of `Finished` or
`Failed`. The gRPC servicer (gateway/servicer.py) and the HTTP handlers (gateway/http.py)
only translate those items into their wire formats; validation, queueing, resuming,
cancellation, rate limits and metrics live here once.

When a call ends for any reason other than its job finishing (caller cancelled or
disconnected, deadline, error), the job is cancelled so no worker keeps generating for
nobody, and the tokens reserved for it are settled with the rate limiter.
"""

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass

from google.rpc import code_pb2

from chat.v1 import chat_pb2
from common import codec
from gateway import metrics
from gateway.apikeys import KeyRecord
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
    RedisOutOfMemory,
    RequestTooLarge,
    ServiceError,
    TooManyCalls,
    Unauthenticated,
    Unavailable,
    from_failed_event,
)
from gateway.metrics import CallRecorder
from gateway.queue import JobQueue
from gateway.ratelimit import Budget, RateLimiter
from gateway.resume import ReplyProgress
from gateway.subscription import Subscription
from gateway.validation import Limits, validate
from gateway.wire import Undecodable


@dataclass(frozen=True)
class Caller:
    """What a transport knows about the caller: credentials and how long it waits."""

    metadata: Sequence[tuple[str, str | bytes]]  # `authorization` is read from here
    timeout: float | None  # seconds the caller waits; None: the gateway's default
    transport: str = "grpc"  # "grpc" or "http": the `transport` label of the request metrics


@dataclass(frozen=True)
class Usage:
    """Token counts and timings (seconds) of a finished completion."""

    prompt_tokens: int
    completion_tokens: int
    queue_time: float
    prompt_time: float
    completion_time: float

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def total_time(self) -> float:
        return self.prompt_time + self.completion_time


@dataclass(frozen=True)
class Accepted:
    """The job is queued: what every response of the call shares, and the key's budget."""

    request_id: str
    created: int
    model: str
    ratelimit: tuple[tuple[str, str], ...]  # x-ratelimit-* headers; empty without limits

    @property
    def completion_id(self) -> str:
        return f"chatcmpl-{self.request_id}"


@dataclass(frozen=True)
class Started:
    """A worker took the job (sent once, even when another worker takes the job over)."""

    system_fingerprint: str


@dataclass(frozen=True)
class Text:
    """Generated text: each piece once for a stream; the whole reply at once for a unary call."""

    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str
    usage: Usage
    system_fingerprint: str


@dataclass(frozen=True)
class Failed:
    """The call ends with this error; nothing follows it."""

    error: ServiceError


Item = Accepted | Started | Text | Finished | Failed
Request = chat_pb2.ChatCompletionRequest | Undecodable | ServiceError


class Relay:
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
        self._limits = Limits.from_settings(settings)
        self.open_calls = 0

    async def run(self, request: Request, caller: Caller, *, stream: bool) -> AsyncGenerator[Item]:
        """The call's items, ending with Finished or Failed. Closing it early cancels the job.

        A request its transport could not even decode arrives as Undecodable or as the
        transport's ServiceError, and is refused here like any other, in the same metrics.
        """
        rpc = "StreamChatCompletion" if stream else "ChatCompletion"
        model = ""
        if isinstance(request, chat_pb2.ChatCompletionRequest):
            # GATEWAY_MODEL_ALIASES: the rest of the call (keys, queue, responses) sees the served name.
            request.model = model = self._catalog.resolve(request.model)
        recorder = CallRecorder(rpc, metrics.model_label(model, self._catalog.names), caller.transport)
        code, ended = "OK", False
        try:
            async for item in self._run(request, caller, recorder, stream):
                if isinstance(item, Failed):
                    code = code_pb2.Code.Name(item.error.code)
                ended = isinstance(item, Finished | Failed)
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            if not ended:
                code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"  # a bug: the transport answers with an internal error
            raise
        finally:
            recorder.done(code)

    async def _run(
        self,
        request: Request,
        caller: Caller,
        recorder: CallRecorder,
        stream: bool,
    ) -> AsyncIterator[Item]:
        # The open-call slot is taken before the first await, so a burst cannot pass the limit
        # while earlier calls are still being admitted.
        if self.open_calls >= self._settings.max_concurrent_calls:
            metrics.REJECTIONS.labels(recorder.model, "too_many_calls").inc()
            yield Failed(TooManyCalls(self._settings.max_concurrent_calls))
            return
        self.open_calls += 1
        metrics.OPEN_CALLS.inc()
        try:
            async for item in self._admit_and_relay(request, caller, recorder, stream):
                yield item
        finally:
            self.open_calls -= 1
            metrics.OPEN_CALLS.dec()

    async def _admit_and_relay(
        self,
        request: Request,
        caller: Caller,
        recorder: CallRecorder,
        stream: bool,
    ) -> AsyncIterator[Item]:
        timeout = self._timeout(caller.timeout)
        deadline = time.time() + timeout
        try:
            subscription, budget = await self._admit(request, caller, deadline, recorder)
        except ServiceError as exc:
            yield Failed(exc)
            return
        ratelimit = budget.metadata() if budget is not None else ()
        translation = _Translation(stream, recorder)
        try:
            yield Accepted(subscription.request_id, int(time.time()), subscription.model, ratelimit)
            ends_at = asyncio.get_running_loop().time() + timeout
            while not translation.finished:
                # The deadline bounds the waits for the job, never a yield: a timeout around a
                # yield would fire in the transport (a slow write) and end the call without a status.
                async with asyncio.timeout_at(ends_at):
                    event = await subscription.next()
                for item in translation.items(event):
                    yield item
        except TimeoutError:
            passed = f"deadline of {timeout:.1f}s passed before the completion finished"
            yield Failed(DeadlineExceeded(passed))
        except ServiceError as exc:
            if isinstance(exc, Aborted):
                metrics.RESUMED_STREAMS.labels(recorder.model, "aborted").inc()
            yield Failed(exc)
        finally:
            done = translation.finished
            self._queue.release(subscription, cancel_until=None if done else deadline)
            if budget is not None and self._rate_limiter is not None:
                # Calls that did not finish are charged their whole reservation.
                unused = subscription.max_tokens - translation.completion_tokens if done else 0
                await self._rate_limiter.refund(budget, unused)

    async def _admit(
        self,
        request: Request,
        caller: Caller,
        deadline: float,
        recorder: CallRecorder,
    ) -> tuple[Subscription, Budget | None]:
        """Everything that may refuse a call before its job exists: caller, limits, validation, capacity."""
        try:
            # The caller first: who has no valid key learns nothing about the request's faults.
            record = None
            if self._authenticator is not None:
                model = request.model if isinstance(request, chat_pb2.ChatCompletionRequest) else None
                record = await self._authenticator.authenticate(caller.metadata, model)
            if isinstance(request, ServiceError):
                raise request
            if isinstance(request, Undecodable):
                raise MalformedRequest(f"the request is not a valid {request.message_type}: {request.error}")
            valid = validate(request, self._catalog, self._settings.default_max_tokens, self._limits)
            if record is None or self._rate_limiter is None:
                return await self._queue.submit(valid, deadline), None
            tokens = len(valid.prompt_token_ids) + valid.max_tokens
            _check_fits_budget(record, len(valid.prompt_token_ids), valid.max_tokens)
            budget = await self._rate_limiter.admit(record, tokens)
            try:
                return await self._queue.submit(valid, deadline), budget
            except ServiceError:
                await self._rate_limiter.refund(budget, tokens)  # no job, nothing to charge
                raise
        except ServiceError as exc:
            metrics.REJECTIONS.labels(recorder.model, _rejection_reason(exc)).inc()
            raise

    def _timeout(self, remaining: float | None) -> float:
        default = self._settings.default_timeout_seconds
        return default if remaining is None else max(0.0, min(remaining, default))


class _Translation:
    """Turns one job's queue events into items: taken-over jobs resumed without a gap, unary text joined."""

    def __init__(self, stream: bool, recorder: CallRecorder) -> None:
        self._stream = stream
        self._recorder = recorder
        self._reply = ReplyProgress(stream)
        self._fingerprint = ""
        self._attempt = 0
        self.finished = False  # the job reached its terminal event (Finished or Failed)
        self.completion_tokens = 0

    def items(self, event: codec.Event) -> list[Item]:
        kind = event.WhichOneof("kind")
        if kind == "failed":
            self.finished = True  # the worker has already let go of the job
            raise from_failed_event(event.failed)
        if kind == "started":
            return self._on_started(event)
        if kind == "delta":
            self._recorder.delta()
            text = self._reply.add(event.delta)
            return [Text(text)] if text else []
        if kind == "finished":
            return self._on_finished(event.finished)
        return []

    def _on_started(self, event: codec.Event) -> list[Item]:
        self._fingerprint = event.started.system_fingerprint
        first = not self._attempt
        self._attempt = max(event.attempt, 1)
        if first:
            return [Started(self._fingerprint)]
        outcome = self._reply.take_over(event.started)  # raises Aborted when it cannot go on
        metrics.RESUMED_STREAMS.labels(self._recorder.model, outcome).inc()
        return []

    def _on_finished(self, f: codec.Finished) -> list[Item]:
        self.finished = True
        self.completion_tokens = f.completion_tokens
        self._recorder.finished(f.prompt_tokens, f.completion_tokens, f.queue_time)
        usage = Usage(f.prompt_tokens, f.completion_tokens, f.queue_time, f.prompt_time, f.completion_time)
        finished: Item = Finished(f.finish_reason, usage, self._fingerprint)
        text = "".join(self._reply.pieces)
        return [finished] if self._stream or not text else [Text(text), finished]


def _check_fits_budget(record: KeyRecord, prompt_tokens: int, max_tokens: int) -> None:
    """A call larger than the key's whole per-minute budget is refused for good, not "retry later"."""
    tpm = record.tokens_per_minute
    if tpm and prompt_tokens + max_tokens > tpm:
        raise InvalidField(
            "max_tokens",
            f"is too large for API key {record.name!r}: prompt {prompt_tokens} + max_tokens {max_tokens}"
            f" tokens exceed its limit of {tpm} tokens per minute; lower max_tokens",
        )


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
        (RedisOutOfMemory, "redis_full"),
        (RequestTooLarge, "too_large"),
    ]
    return next((reason for kind, reason in reasons if isinstance(error, kind)), "other")
