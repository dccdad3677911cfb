"""The one call path both transports share: admit -> submit -> relay -> cancel/refund.

`Relay.run` takes a public request and yields ready-made items: `Accepted` (the job is
queued), `Started` (a worker took it), `Text`, then exactly one of `Finished` or
`Failed`. The gRPC servicer (gateway/servicer.py) and the HTTP handlers (gateway/http.py)
only translate those items into their wire formats; validation, queueing, resuming,
cancellation, rate limits and metrics live here once.

When a call ends for any reason other than its job finishing (caller cancelled or
disconnected, deadline, error), the job is cancelled so no worker keeps generating for
nobody. However a call ends, its key is charged what the engine generated (`_settle`).

A call with an idempotency key (gateway/idempotency.py) claims it once its API key is known,
before any limit or validation: a retry of it gets the first call's answer instead, free.

A request without max_tokens gets GATEWAY_DEFAULT_MAX_TOKENS, capped by what the context
window leaves after the prompt (gateway/validation.py) and by what the key's tokens per
minute leave after it (`_default_fits_budget`): a default never makes a valid request invalid.
"""

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from google.rpc import code_pb2

from chat.v1 import chat_pb2
from common import codec, tracing
from gateway import metrics
from gateway.apikeys import KeyRecord
from gateway.auth import Authenticator
from gateway.catalog import ModelCatalog
from gateway.config import GatewaySettings
from gateway.errors import (
    Aborted,
    DeadlineExceeded,
    IdempotencyConflict,
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
from gateway.idempotency import Answer, Claim, IdempotencyKeys, idempotency_key
from gateway.metrics import CallRecorder
from gateway.presence import NoLiveWorker
from gateway.queue import JobQueue
from gateway.ratelimit import Budget, RateLimiter
from gateway.resume import ReplyProgress
from gateway.subscription import Subscription
from gateway.tokenizing import PromptValidator
from gateway.validation import Limits, ValidRequest
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
        idempotency: IdempotencyKeys | None = None,
        tracer: tracing.Tracing = tracing.OFF,
    ) -> None:
        self._settings = settings
        self._tracer = tracer
        self._catalog = catalog
        self._queue = queue
        self._authenticator = authenticator  # None: GATEWAY_AUTH=off
        self._rate_limiter = rate_limiter
        self._idempotency = idempotency  # None: idempotency keys are ignored
        self._limits = Limits.from_settings(settings)
        self._validator = PromptValidator(
            catalog, settings.default_max_tokens, self._limits, settings.tokenizer_threads
        )
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
        label = metrics.model_label(model, self._catalog.names)
        # The label, not the name asked for: a caller's made-up model name goes in no span either.
        span = self._tracer.call(rpc, label, caller.transport, caller.metadata)
        recorder = CallRecorder(rpc, label, caller.transport, span)
        code, ended = "OK", False
        try:
            # aclosing: a caller that leaves closes the inner generators at once, so the job is
            # cancelled and the call charged now, not whenever the garbage collector gets to them.
            async with contextlib.aclosing(self._run(request, caller, recorder, stream)) as items:
                async for item in items:
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
    ) -> AsyncGenerator[Item]:
        # The open-call slot is taken before the first await, so a burst cannot pass the limit
        # while earlier calls are still being admitted.
        if self.open_calls >= self._settings.max_concurrent_calls:
            metrics.REJECTIONS.labels(recorder.model, "too_many_calls").inc()
            yield Failed(TooManyCalls(self._settings.max_concurrent_calls))
            return
        self.open_calls += 1
        metrics.OPEN_CALLS.inc()
        try:
            async with contextlib.aclosing(self._admit_and_relay(request, caller, recorder, stream)) as items:
                async for item in items:
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
    ) -> AsyncGenerator[Item]:
        timeout = self._timeout(caller.timeout)
        deadline = time.time() + timeout
        try:
            admitted = await self._admit(request, caller, deadline, recorder)
        except ServiceError as exc:
            yield Failed(exc)
            return
        if isinstance(admitted, Answer):
            for item in _replay(admitted, stream):
                yield item
            return
        subscription, budget, claim = admitted
        ratelimit = budget.metadata() if budget is not None else ()
        translation = _Translation(stream, recorder)
        answered = False
        try:
            accepted = Accepted(subscription.request_id, int(time.time()), subscription.model, ratelimit)
            recorder.span.accepted(accepted.request_id)
            yield accepted
            ends_at = asyncio.get_running_loop().time() + timeout
            texts: list[str] = []  # what the caller was sent, for the answer a retry gets
            while not translation.finished:
                # The deadline bounds the waits for the job, never a yield: a timeout around a
                # yield would fire in the transport (a slow write) and end the call without a status.
                async with asyncio.timeout_at(ends_at):
                    event = await subscription.next()
                items = translation.items(event)
                if claim is not None and self._idempotency is not None:
                    texts += [item.text for item in items if isinstance(item, Text)]
                    if finished := next((i for i in items if isinstance(i, Finished)), None):
                        # Stored before the caller sees the end, so a retry after it finds the answer.
                        answer = _answer(accepted, "".join(texts), finished)
                        answered = await self._idempotency.answer(claim, answer)
                for item in items:
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
            await self._settle(subscription, budget, translation)
            if claim is not None and not answered and self._idempotency is not None:
                await self._idempotency.give_up(claim)

    async def _settle(
        self, subscription: Subscription, budget: Budget | None, translation: "_Translation"
    ) -> None:
        """Charges the call the tokens its job generated, however it ended; gives the rest back.

        A finished job says how many it generated. Any other ending (the caller left, a deadline,
        a worker's error, lost events) is charged the larger of what the events received say and
        what the job's progress record holds now (it is ahead when events were lost or in flight;
        the few tokens a worker generates before it sees the cancel are not charged). A call whose
        job never reached a worker gives back its request and every token.
        """
        if budget is None or self._rate_limiter is None:
            return
        if translation.answered:
            generated = translation.completion_tokens
        else:
            in_record = await self._queue.generated_tokens(subscription.request_id)
            generated = max(translation.tokens_received, in_record)
        generated = min(generated, subscription.max_tokens)
        if not translation.started and not generated:
            await self._rate_limiter.refund(budget, budget.reserved_tokens, requests=1)
        else:
            await self._rate_limiter.refund(budget, subscription.max_tokens - generated)

    async def _admit(
        self,
        request: Request,
        caller: Caller,
        deadline: float,
        recorder: CallRecorder,
    ) -> tuple[Subscription, Budget | None, Claim | None] | Answer:
        """Everything that may refuse a call before its job exists: caller, limits, validation,
        capacity; or the answer to an earlier call with the same idempotency key."""
        try:
            # The caller first: who has no valid key learns nothing about the request's faults.
            record = None
            if self._authenticator is not None:
                model = request.model if isinstance(request, chat_pb2.ChatCompletionRequest) else None
                record = await self._authenticator.authenticate(caller.metadata, model)
                recorder.span.caller(record.name)
            if isinstance(request, ServiceError):
                raise request
            if isinstance(request, Undecodable):
                raise MalformedRequest(f"the request is not a valid {request.message_type}: {request.error}")
            # A retry under an idempotency key gets the first call's answer before any limit is
            # checked: it costs nothing, so a key whose minute is used up still gets its answer.
            claim = await self._claim(request, caller, record, deadline)
            if isinstance(claim, Answer):
                return claim
            try:
                if record is not None and self._rate_limiter is not None:
                    # A key over its requests per minute is refused before its request costs any work.
                    await self._rate_limiter.check_requests(record)
                try:
                    valid = await self._validator.validate(request)
                except InvalidField:
                    if record is not None and self._rate_limiter is not None:
                        await self._rate_limiter.count_refused(record)
                    raise
                if record is not None and not request.HasField("max_tokens"):
                    valid = _default_fits_budget(record, valid)
                valid = _traced(valid, recorder.span)
                subscription, budget = await self._submit(valid, record, deadline)
            except BaseException:
                if claim is not None and self._idempotency is not None:
                    await asyncio.shield(self._idempotency.give_up(claim))
                raise
            return subscription, budget, claim
        except ServiceError as exc:
            metrics.REJECTIONS.labels(recorder.model, _rejection_reason(exc)).inc()
            raise

    async def _claim(
        self,
        request: chat_pb2.ChatCompletionRequest,
        caller: Caller,
        record: KeyRecord | None,
        deadline: float,
    ) -> Claim | Answer | None:
        """Claims the caller's idempotency key for this call, or gets the answer of the call that has it."""
        key = idempotency_key(caller.metadata)
        if key is None or self._idempotency is None:
            return None
        scope = record.digest if record is not None else "anonymous"
        body = request.SerializeToString(deterministic=True)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.time())):
                return await self._idempotency.claim_or_wait(key, scope, body, deadline - time.time())
        except TimeoutError:
            raise DeadlineExceeded(
                f"deadline passed while the first call with idempotency key {key!r} was still running"
            ) from None

    async def _submit(
        self, valid: ValidRequest, record: KeyRecord | None, deadline: float
    ) -> tuple[Subscription, Budget | None]:
        """Counts the call against its key's limits, then queues its job."""
        if record is None or self._rate_limiter is None:
            return await self._queue.submit(valid, deadline), None
        tokens = len(valid.prompt_token_ids) + valid.max_tokens
        _check_fits_budget(record, len(valid.prompt_token_ids), valid.max_tokens)
        budget = await self._rate_limiter.admit(record, tokens)
        try:
            return await self._queue.submit(valid, deadline), budget
        except BaseException:
            # No job (refused, or the caller left while it waited for a worker or for Redis):
            # nothing to charge, and the request is given back too.
            await asyncio.shield(self._rate_limiter.refund(budget, tokens, requests=1))
            raise

    def close(self) -> None:
        """Releases what the relay holds besides calls (the tokenizer threads)."""
        self._validator.close()

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
        self.answered = False  # ... and it was Finished
        self.completion_tokens = 0  # of the Finished event

    @property
    def started(self) -> bool:
        """A worker took the job."""
        return self._attempt > 0

    @property
    def tokens_received(self) -> int:
        """Tokens behind the deltas received (of the attempt the reply comes from)."""
        return self._reply.completion_tokens

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
        self.finished = self.answered = True
        self.completion_tokens = f.completion_tokens
        self._recorder.finished(f.prompt_tokens, f.completion_tokens, f.queue_time, f.finish_reason)
        usage = Usage(f.prompt_tokens, f.completion_tokens, f.queue_time, f.prompt_time, f.completion_time)
        finished: Item = Finished(f.finish_reason, usage, self._fingerprint)
        text = "".join(self._reply.pieces)
        return [finished] if self._stream or not text else [Text(text), finished]


def _answer(call: Accepted, text: str, finished: Finished) -> Answer:
    u = finished.usage
    return Answer(
        call.request_id, call.created, call.model, text, finished.finish_reason, finished.system_fingerprint,
        u.prompt_tokens, u.completion_tokens, u.queue_time, u.prompt_time, u.completion_time,
    )  # fmt: skip


def _replay(answer: Answer, stream: bool) -> list[Item]:
    """A finished call's answer again, for a retry: the same items, the text in one piece."""
    usage = Usage(
        answer.prompt_tokens,
        answer.completion_tokens,
        answer.queue_time,
        answer.prompt_time,
        answer.completion_time,
    )
    items: list[Item] = [
        Accepted(answer.request_id, answer.created, answer.model, ()),
        Started(answer.system_fingerprint),
    ]
    if answer.text:
        items.append(Text(answer.text))
    return [*items, Finished(answer.finish_reason, usage, answer.system_fingerprint)]


def _default_fits_budget(record: KeyRecord, valid: ValidRequest) -> ValidRequest:
    """A default max_tokens is lowered to what the key's tokens per minute leave after the prompt
    (at least 1), so a request that did not ask for a length is not refused for its default."""
    room = record.tokens_per_minute - len(valid.prompt_token_ids)
    if not record.tokens_per_minute or room < 1 or valid.max_tokens <= room:
        return valid
    return dataclasses.replace(valid, max_tokens=room)


def _traced(valid: ValidRequest, span: tracing.CallSpan) -> ValidRequest:
    """The job carries the call's trace context, so its workers trace under the call's span."""
    carrier = span.carrier()
    return dataclasses.replace(valid, trace_context=tuple(carrier.items())) if carrier else valid


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
        (NoLiveWorker, "no_worker"),  # before Unavailable, which it is
        (Unavailable, "redis_unavailable"),
        (RedisOutOfMemory, "redis_full"),
        (RequestTooLarge, "too_large"),
        (IdempotencyConflict, "idempotency_conflict"),
    ]
    return next((reason for kind, reason in reasons if isinstance(error, kind)), "other")
