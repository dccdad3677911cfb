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
before any limit or validation: a retry of it attaches to the first call's job instead, free.

Every job's events also go to its completion log (gateway/completion_log.py), from which
`Relay.resume` replays a completion after any chunk and follows it to its end: a stream whose
connection dropped resumes there, and an idempotent retry attaches there from the start. So
that the rest is there to resume, a stream (or an idempotent call) whose caller leaves keeps
its job running, detached, while somebody reads its log, and for GATEWAY_RESUME_GRACE_SECONDS
in any case; then, if nobody came back, the job is cancelled as at once before. The charge is
settled when the job ends, so it is the same whether or not the caller came back.

A request without max_tokens gets GATEWAY_DEFAULT_MAX_TOKENS, capped by what the context
window leaves after the prompt (gateway/validation.py) and by what the key's tokens per
minute leave after it (`_default_fits_budget`): a default never makes a valid request invalid.
"""

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass

from google.rpc import code_pb2
from redis.exceptions import RedisError

from chat.v1 import chat_pb2
from common import codec, tracing
from gateway import metrics
from gateway.apikeys import KeyRecord
from gateway.auth import Authenticator
from gateway.catalog import ModelCatalog
from gateway.completion_log import CallRecord, CompletionLog, parse_entry
from gateway.config import GatewaySettings
from gateway.errors import (
    JOB_FAILURES,
    Aborted,
    CompletionNotFound,
    DeadlineExceeded,
    FlexCapacityExceeded,
    IdempotencyConflict,
    InvalidField,
    JobFailed,
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
from gateway.idempotency import Attach, Claim, IdempotencyKeys, idempotency_key
from gateway.metrics import CallRecorder
from gateway.presence import NoLiveWorker
from gateway.queue import JobQueue
from gateway.ratelimit import Budget, RateLimiter
from gateway.resume import Logprobs, ReplyProgress, ToolCalls
from gateway.subscription import Subscription
from gateway.tiers import DEFAULT_TIERS, ON_DEMAND
from gateway.tokenizing import PromptValidator
from gateway.validation import Limits, ValidRequest
from gateway.wire import Undecodable

log = logging.getLogger(__name__)


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
    choices: int = 1  # the request's n: responses have this many choices, indexed from 0
    service_tier: str = ON_DEMAND  # the tier serving the call, which responses report

    @property
    def completion_id(self) -> str:
        return f"chatcmpl-{self.request_id}"


# `seq` of the items below: the position of the last job event behind the item (gateway/
# subscription.py), which a stream sends with it so that its caller can resume after it.


@dataclass(frozen=True)
class Started:
    """A worker took the job (sent once, even when another worker takes the job over)."""

    system_fingerprint: str
    seq: int = 0
    replayed: bool = False  # a resume's caller had the role chunk: only its fingerprint is news


@dataclass(frozen=True)
class Text:
    """Generated text: each piece once for a stream; the whole reply at once for a unary call.

    With logprobs asked for, the entries of the tokens behind it (a stream's last may have
    tokens and no text); empty otherwise.
    """

    text: str
    seq: int = 0
    logprobs: Logprobs = ()
    index: int = 0  # the choice it belongs to
    tool_calls: ToolCalls = ()  # the choice's tool calls, all on its last Text


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # of choice 0
    usage: Usage  # of all choices together
    system_fingerprint: str
    seq: int = 0
    replayed: bool = False  # a resume's caller had this chunk already: end without sending it
    finish_reasons: tuple[str, ...] = ()  # of each choice, by index

    def finish_reason_of(self, index: int) -> str:
        return self.finish_reasons[index] if index < len(self.finish_reasons) else self.finish_reason


@dataclass(frozen=True)
class Failed:
    """The call ends with this error; nothing follows it."""

    error: ServiceError


Item = Accepted | Started | Text | Finished | Failed
Request = chat_pb2.ChatCompletionRequest | Undecodable | ServiceError


class _EndOfLog(ServiceError):
    """A snapshot (Relay.resume without follow) has read all the log holds now."""


@dataclass
class _OpenCall:
    """A call whose job runs: what ending it needs, whether its caller stays or leaves."""

    subscription: Subscription
    budget: Budget | None
    claim: Claim | None
    translation: "_Translation"
    ends_at: float  # event-loop time of the deadline
    deadline: float  # Unix time of the deadline


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
        completion_log: CompletionLog | None = None,
    ) -> None:
        self._settings = settings
        self._tracer = tracer
        self._catalog = catalog
        self._queue = queue
        self._authenticator = authenticator  # None: GATEWAY_AUTH=off
        self._rate_limiter = rate_limiter
        self._idempotency = idempotency  # None: idempotency keys are ignored
        self._log = completion_log  # None: nothing resumes, and a caller that leaves cancels its job
        self._detached: set[asyncio.Task[None]] = set()  # jobs running on after their caller left
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
        recorder = self._recorder(rpc, label, caller)
        async with contextlib.aclosing(
            self._recorded(self._admit_and_relay(request, caller, recorder, stream), recorder)
        ) as items:
            async for item in items:
                yield item

    async def resume(
        self, completion_id: str, caller: Caller, starting_after: int = -1, *, follow: bool = True
    ) -> AsyncGenerator[Item]:
        """A completion again, from its log: Accepted, then the stream's items after position
        `starting_after` (-1: all), following the job to its end; without follow, only what the
        log holds now (ending with Finished only if the job has). Free: nothing is charged."""
        rpc = "ResumeChatCompletion" if follow else "GetChatCompletion"
        recorder = self._recorder(rpc, "", caller)
        async with contextlib.aclosing(
            self._recorded(self._resume(completion_id, caller, starting_after, follow), recorder)
        ) as items:
            async for item in items:
                yield item

    def _recorder(self, rpc: str, label: str, caller: Caller) -> CallRecorder:
        # The label, not the name asked for: a caller's made-up model name goes in no span either.
        span = self._tracer.call(rpc, label, caller.transport, caller.metadata)
        return CallRecorder(rpc, label, caller.transport, span)

    async def _recorded(self, call: AsyncGenerator[Item], recorder: CallRecorder) -> AsyncGenerator[Item]:
        """The call's items, counted in the request metrics by how the call ended."""
        code, ended = "OK", False
        try:
            # aclosing: a caller that leaves closes the inner generators at once, so the job is
            # cancelled (or detached) and the call charged now, not whenever the GC gets to them.
            async with contextlib.aclosing(self._limited(call, recorder)) as items:
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

    async def _limited(self, call: AsyncGenerator[Item], recorder: CallRecorder) -> AsyncGenerator[Item]:
        # The open-call slot is taken before the first await, so a burst cannot pass the limit
        # while earlier calls are still being admitted.
        if self.open_calls >= self._settings.max_concurrent_calls:
            metrics.REJECTIONS.labels(recorder.model, "too_many_calls").inc()
            yield Failed(TooManyCalls(self._settings.max_concurrent_calls))
            return
        self.open_calls += 1
        metrics.OPEN_CALLS.inc()
        try:
            async with contextlib.aclosing(call) as items:
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
        if isinstance(admitted, Attach):
            async with contextlib.aclosing(self._attach(admitted.request_id, caller, stream)) as items:
                async for item in items:
                    yield item
            return
        subscription, budget, claim = admitted
        ratelimit = budget.metadata() if budget is not None else ()
        ends_at = asyncio.get_running_loop().time() + timeout
        call = _OpenCall(
            subscription,
            budget,
            claim,
            _Translation(stream, recorder, subscription.choices, self._queue.waits.job_finished),
            ends_at,
            deadline,
        )
        translation = call.translation
        error: ServiceError | None = None
        left = False
        try:
            if claim is not None and self._idempotency is not None:
                # Inside the try: a caller that leaves meanwhile still ends (or detaches) the job.
                await self._idempotency.bind(claim, subscription.request_id)
            created = subscription.created or int(time.time())
            accepted = Accepted(
                subscription.request_id,
                created,
                subscription.model,
                ratelimit,
                subscription.choices,
                subscription.service_tier,
            )
            recorder.span.accepted(accepted.request_id)
            recorder.service_tier = accepted.service_tier
            yield accepted
            while not translation.finished:
                # The deadline bounds the waits for the job, never a yield: a timeout around a
                # yield would fire in the transport (a slow write) and end the call without a status.
                async with asyncio.timeout_at(ends_at):
                    event = await subscription.next()
                for item in translation.items(event, subscription.position):
                    yield item
        except TimeoutError:
            error = DeadlineExceeded(f"deadline of {timeout:.1f}s passed before the completion finished")
            yield Failed(error)
        except ServiceError as exc:
            if isinstance(exc, Aborted):
                metrics.RESUMED_STREAMS.labels(recorder.model, "aborted").inc()
            error = exc
            yield Failed(exc)
        except (asyncio.CancelledError, GeneratorExit):
            left = True
            raise
        finally:
            if left and not translation.finished and self._log is not None and (stream or claim is not None):
                # Somebody may come back for the rest: a resumed stream, or a retry with the key.
                self._detach(call)
            else:
                await self._end(call, error)

    async def _end(self, call: _OpenCall, error: ServiceError | None) -> None:
        """Ends the call's part in its job: stops or leaves the job, charges, keeps or frees its key."""
        request_id, finished = call.subscription.request_id, call.translation.finished
        self._queue.release(call.subscription, cancel_until=None if finished else call.deadline)
        await self._settle(call.subscription, call.budget, call.translation)
        claim, idempotency = call.claim, self._idempotency
        if claim is not None and idempotency is not None:
            kept = call.translation.answered and await idempotency.keep(claim, request_id)
            if not kept:
                await idempotency.give_up(claim)
        if self._log is not None:
            if error is None and not call.translation.answered:
                error = JobFailed(JOB_FAILURES[codec.FailureKind.FAILURE_KIND_CANCELLED], "the caller left")
            await self._log.ended(request_id, error)

    def _detach(self, call: _OpenCall) -> None:
        task = asyncio.create_task(self._run_detached(call), name=f"detached-{call.subscription.request_id}")
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)

    async def _run_detached(self, call: _OpenCall) -> None:
        """Follows a job whose caller left, so that it can be resumed: to its end while somebody
        reads its log or within the grace period; else it is cancelled. Charged when it ends."""
        assert self._log is not None
        loop = asyncio.get_running_loop()
        look_at = loop.time() + self._log.grace_seconds
        error: ServiceError | None = None
        try:
            while not call.translation.finished:
                now = loop.time()
                if now >= call.ends_at:
                    error = DeadlineExceeded("deadline passed before the completion finished")
                    break
                if now >= look_at:
                    if not await self._log.is_watched(call.subscription.request_id):
                        break  # nobody came back: cancelled below
                    look_at = now + 1.0
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, min(look_at, call.ends_at) - now)):
                        event = await call.subscription.next()
                    call.translation.items(event, call.subscription.position)
        except ServiceError as exc:
            error = exc
        finally:
            outcome = "finished" if call.translation.answered else "failed" if error else "cancelled"
            metrics.DETACHED_JOBS.labels(call.subscription.model, outcome).inc()
            try:
                await self._end(call, error)
            except Exception:
                log.exception("cannot end detached job %s", call.subscription.request_id)

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
    ) -> tuple[Subscription, Budget | None, Claim | None] | Attach:
        """Everything that may refuse a call before its job exists: caller, limits, validation,
        capacity; or the job of an earlier call with the same idempotency key."""
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
            # A retry under an idempotency key attaches to the first call's job before any limit is
            # checked: it costs nothing, so a key whose minute is used up still gets its answer.
            claim = await self._claim(request, caller, record, deadline)
            if isinstance(claim, Attach):
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
                if record is not None and request.service_tier in ("", *DEFAULT_TIERS):
                    valid = dataclasses.replace(valid, service_tier=record.service_tier)
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
    ) -> Claim | Attach | None:
        """Claims the caller's idempotency key for this call, or gets the job of the call that has it."""
        key = idempotency_key(caller.metadata)
        if key is None or self._idempotency is None:
            return None
        scope = _owner(record)
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
        owner = _owner(record)
        if record is None or self._rate_limiter is None:
            return await self._queue.submit(valid, deadline, owner), None
        tokens = len(valid.prompt_token_ids) + valid.max_tokens * valid.n
        _check_fits_budget(record, len(valid.prompt_token_ids), valid.max_tokens, valid.n)
        budget = await self._rate_limiter.admit(record, tokens)
        try:
            return await self._queue.submit(valid, deadline, owner), budget
        except BaseException:
            # No job (refused, or the caller left while it waited for a worker or for Redis):
            # nothing to charge, and the request is given back too.
            await asyncio.shield(self._rate_limiter.refund(budget, tokens, requests=1))
            raise

    async def close(self) -> None:
        """Releases what the relay holds besides calls: the tokenizer threads, and jobs whose
        callers left (cancelled and charged now, while Redis is still there to be told)."""
        self._validator.close()
        detached = list(self._detached)
        for task in detached:
            task.cancel()
        await asyncio.gather(*detached, return_exceptions=True)

    async def _resume(
        self, completion_id: str, caller: Caller, starting_after: int, follow: bool
    ) -> AsyncGenerator[Item]:
        try:
            record = None
            if self._authenticator is not None:
                record = await self._authenticator.authenticate(caller.metadata, None)
            request_id = _request_id(completion_id)
        except ServiceError as exc:
            yield Failed(exc)
            return
        attached = self._attach(request_id, caller, True, starting_after, follow, record)
        async with contextlib.aclosing(attached) as items:
            async for item in items:
                yield item

    async def _attach(
        self,
        request_id: str,
        caller: Caller,
        stream: bool,
        starting_after: int = -1,
        follow: bool = True,
        key: KeyRecord | None = None,
    ) -> AsyncGenerator[Item]:
        """The completion's items from its log after `starting_after`, as a call would get them."""
        try:
            if self._log is None:
                raise CompletionNotFound(request_id)
            if key is None and self._authenticator is not None:
                key = await self._authenticator.authenticate(caller.metadata, None)
            call = await self._log.open(request_id, _owner(key))
        except ServiceError as exc:
            yield Failed(exc)
            return
        yield Accepted(call.request_id, call.created, call.model, (), call.choices, call.service_tier)
        subscription = Subscription(call.request_id, call.model, cursor=starting_after)
        translation = _Translation(stream, None, call.choices)
        loop = asyncio.get_running_loop()
        ends_at = loop.time() + min(call.deadline + 5 - time.time(), self._timeout(caller.timeout))
        async with self._log.watching(request_id):
            reader = asyncio.create_task(self._read_log(call, subscription, follow))
            try:
                while not translation.finished:
                    async with asyncio.timeout_at(ends_at):
                        event = await subscription.next()
                    for item in translation.items(event, subscription.position):
                        if isinstance(item, Finished) and item.seq <= starting_after:
                            # The caller has the end already: the transport ends cleanly, sending nothing.
                            yield dataclasses.replace(item, replayed=True)
                        elif isinstance(item, Started) and starting_after >= 0:
                            # The caller had the role chunk (a job started over has another).
                            yield dataclasses.replace(item, replayed=True)
                        elif not isinstance(item, Text | Finished) or item.seq > starting_after:
                            yield item
            except _EndOfLog:
                return
            except TimeoutError:
                yield Failed(DeadlineExceeded("deadline passed before the completion finished"))
            except ServiceError as exc:
                yield Failed(exc)
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

    async def _read_log(self, call: CallRecord, subscription: Subscription, follow: bool) -> None:
        """Hands the log's events to the subscription, as the reply reader does for a live call."""
        assert self._log is not None
        after = b"0-0"
        try:
            while not subscription.done:
                entries = await self._log.read(call.request_id, after, block=follow)
                for entry_id, fields in entries:
                    after = entry_id
                    parsed = parse_entry(call.request_id, fields)
                    if isinstance(parsed, ServiceError):
                        subscription.fail(parsed)
                    elif parsed is not None:
                        subscription.deliver(parsed)
                if not follow:
                    subscription.fail(_EndOfLog("the end of what the log holds"))
                elif not entries and not await self._log.exists(call.request_id):
                    subscription.fail(CompletionNotFound(call.request_id))
        except RedisError as exc:
            subscription.fail(Unavailable.hiding("cannot read the completion", exc, call.request_id))

    def _timeout(self, remaining: float | None) -> float:
        default = self._settings.default_timeout_seconds
        return default if remaining is None else max(0.0, min(remaining, default))


class _Translation:
    """Turns one job's queue events into items: taken-over jobs resumed without a gap, unary text joined."""

    def __init__(
        self,
        stream: bool,
        recorder: CallRecorder | None,
        choices: int = 1,
        job_time: Callable[[str, float], None] | None = None,
    ) -> None:
        self._stream = stream
        self._job_time = job_time  # told each finished job's engine time (gateway/wait_estimate.py)
        self._choices = choices  # the request's n
        self._recorder = recorder  # None: a resumed call, whose job the metrics counted already
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

    def items(self, event: codec.Event, seq: int) -> list[Item]:
        """The items of the job's next event, whose position (Subscription.position) is seq."""
        kind = event.WhichOneof("kind")
        if kind == "failed":
            self.finished = True  # the worker has already let go of the job
            raise from_failed_event(event.failed)
        if kind == "started":
            return self._on_started(event, seq)
        if kind == "delta":
            delta = event.delta
            # Deltas of tokens only (a reply with tools, held back until whole) reach no caller.
            if self._recorder is not None and (delta.text or delta.logprobs or delta.tool_calls):
                self._recorder.delta()
            text, logprobs, calls = self._reply.add(event.delta)
            return [Text(text, seq, logprobs, event.delta.index, calls)] if text or logprobs or calls else []
        if kind == "finished":
            return self._on_finished(event.finished, seq)
        return []

    def _on_started(self, event: codec.Event, seq: int) -> list[Item]:
        self._fingerprint = event.started.system_fingerprint
        first = not self._attempt
        self._attempt = max(event.attempt, 1)
        if first:
            return [Started(self._fingerprint, seq)]
        outcome = self._reply.take_over(event.started)  # raises Aborted when it cannot go on
        if self._recorder is not None:
            metrics.RESUMED_STREAMS.labels(self._recorder.model, outcome).inc()
        return []

    def _on_finished(self, f: codec.Finished, seq: int) -> list[Item]:
        self.finished = True  # the worker has let go of the job
        reasons = tuple(f.choice_finish_reasons) or (f.finish_reason,)
        if len(reasons) != self._choices:
            # A worker older than n > 1 generated one choice: the others would be made up.
            raise Unavailable(
                f"the worker that ran this job generated {len(reasons)} of the {self._choices} choices"
                " asked for; retry the request"
            )
        self.answered = True
        self.completion_tokens = f.completion_tokens
        if self._recorder is not None:
            self._recorder.finished(f.prompt_tokens, f.completion_tokens, f.queue_time, f.finish_reason)
            if self._job_time is not None:
                self._job_time(self._recorder.model, f.prompt_time + f.completion_time)
        usage = Usage(f.prompt_tokens, f.completion_tokens, f.queue_time, f.prompt_time, f.completion_time)
        finished: Item = Finished(f.finish_reason, usage, self._fingerprint, seq, finish_reasons=reasons)
        if self._stream:
            return [finished]
        replies = sorted(self._reply.choices.items())
        texts = [Text(c.text, seq, tuple(c.logprobs), index, tuple(c.tool_calls)) for index, c in replies]
        return [*(t for t in texts if t.text or t.logprobs or t.tool_calls), finished]


def _owner(record: KeyRecord | None) -> str:
    """Whose calls are these: the API key's digest; all callers alike while auth is off."""
    return record.digest if record is not None else "anonymous"


def _request_id(completion_id: str) -> str:
    """The request id inside a completion id ("chatcmpl-" and 32 hex digits)."""
    request_id = completion_id.removeprefix("chatcmpl-")
    if len(request_id) != 32 or not all(c in "0123456789abcdef" for c in request_id):
        raise CompletionNotFound(request_id[:64])
    return request_id


def _default_fits_budget(record: KeyRecord, valid: ValidRequest) -> ValidRequest:
    """A default max_tokens is lowered to what the key's tokens per minute leave after the prompt
    (shared by the n choices; at least 1), so a request that did not ask for a length is not
    refused for its default."""
    room = (record.tokens_per_minute - len(valid.prompt_token_ids)) // valid.n
    if not record.tokens_per_minute or room < 1 or valid.max_tokens <= room:
        return valid
    return dataclasses.replace(valid, max_tokens=room)


def _traced(valid: ValidRequest, span: tracing.CallSpan) -> ValidRequest:
    """The job carries the call's trace context, so its workers trace under the call's span."""
    carrier = span.carrier()
    return dataclasses.replace(valid, trace_context=tuple(carrier.items())) if carrier else valid


def _check_fits_budget(record: KeyRecord, prompt_tokens: int, max_tokens: int, n: int = 1) -> None:
    """A call larger than the key's whole per-minute budget is refused for good, not "retry later"."""
    tpm = record.tokens_per_minute
    if tpm and prompt_tokens + max_tokens * n > tpm:
        if n == 1:
            field, what, fix = "max_tokens", f"max_tokens {max_tokens}", "lower max_tokens"
        else:  # a default max_tokens is lowered to fit all choices, so n is what does not fit
            field, what, fix = "n", f"max_tokens {max_tokens} x n {n}", "lower n or max_tokens"
        raise InvalidField(
            field,
            f"is too large for API key {record.name!r}: prompt {prompt_tokens} + {what}"
            f" tokens exceed its limit of {tpm} tokens per minute; {fix}",
        )


def _rejection_reason(error: ServiceError) -> str:
    reasons: list[tuple[type[ServiceError], str]] = [
        (InvalidField, "invalid"),
        (Unauthenticated, "unauthenticated"),
        (PermissionDenied, "permission_denied"),
        (RateLimited, "rate_limited"),
        (MalformedRequest, "invalid"),
        (FlexCapacityExceeded, "flex_capacity_exceeded"),  # before QueueFull, which it is
        (QueueFull, "queue_full"),
        (TooManyCalls, "too_many_calls"),
        (NoLiveWorker, "no_worker"),  # before Unavailable, which it is
        (Unavailable, "redis_unavailable"),
        (RedisOutOfMemory, "redis_full"),
        (RequestTooLarge, "too_large"),
        (IdempotencyConflict, "idempotency_conflict"),
        (CompletionNotFound, "not_found"),
    ]
    return next((reason for kind, reason in reasons if isinstance(error, kind)), "other")
