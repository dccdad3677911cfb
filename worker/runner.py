"""Runs one job on the engine and turns it into exactly one stream of events.

Every job ends with exactly one terminal event, Finished or Failed, whatever
happens: engine error, abort, deadline, or a reply that JSON mode cannot accept.
No exception from the engine crosses Redis; it becomes a Failed event.

A job taken over from a worker that died continues from its progress record (what
the earlier attempts published, common/codec.py Progress): the engine gets the prompt
plus the tokens already generated and generates only the rest, and the events carry
on the earlier attempt's seq, so the caller sees no token twice and none missing.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field, replace

from common import codec
from worker.engine.base import (
    MIN_LOGPROB,
    Delta,
    Engine,
    EngineDead,
    EngineError,
    EngineRejected,
    EngineUnavailable,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
    ToolCall,
    ToolUse,
)
from worker.engine.text import StopMatcher
from worker.publisher import EventPublisher, Progress
from worker.structured import output_violation
from worker.tool_calls import InvalidToolCalls, reply_with_tools

log = logging.getLogger(__name__)

FailureKind = codec.FailureKind

# Mixes the number of tokens continued into a job's seed: the continuation samples from its own
# seeded generator, reproducibly for the same job and the same point of continuation.
_SEED_STRIDE = 0x9E3779B97F4A7C15


class JobEvents:
    """Numbers and publishes the events of one attempt at a job, with its progress."""

    def __init__(
        self,
        request_id: str,
        reply_to: str,
        attempt: int,
        publisher: EventPublisher,
        deadline: float = 0.0,
    ) -> None:
        self._request_id = request_id
        self._reply_to = reply_to
        self._attempt = attempt
        self._publisher = publisher
        self._deadline = deadline  # the job's (Unix time; 0: none): its progress record lasts as long
        self._seq = 0
        self._released = 0  # characters of text published
        self._fresh = True  # the next event starts the job's progress record over
        self.continued_from: codec.Progress | None = None
        self.terminal_sent = False
        # Set when the job is handed to another worker: this attempt must say nothing more.
        self.silenced = False
        self.outcome = ""  # "finished" or the failure kind, once the terminal event is sent
        self.tokens = 0  # generated so far, all choices (by this attempt and the ones it continues)
        self._choice_tokens: dict[int, int] = {}  # of each choice
        self._written: asyncio.Future[None] | None = None  # the batch of the last event published

    def continue_from(self, progress: codec.Progress) -> None:
        """This attempt carries on after the events (and text) that earlier attempts published."""
        self.continued_from = progress
        self._seq = progress.last_seq + 1
        self._released = progress.released_chars
        self._fresh = False
        self.tokens = len(progress.token_ids)
        self._choice_tokens = {0: self.tokens}  # (only jobs of one choice are continued)

    @property
    def tokens_generated_here(self) -> int:
        """Tokens this attempt generated (not those of the attempts it continues)."""
        continued = len(self.continued_from.token_ids) if self.continued_from else 0
        return max(0, self.tokens - continued)

    def _send(self, event: codec.Event, token_ids: tuple[int, ...] = ()) -> None:
        if self.silenced or not self._reply_to:
            return
        event.request_id = self._request_id
        event.seq = self._seq
        event.attempt = self._attempt
        self._released += len(event.delta.text)
        progress = Progress(self._attempt, self._seq, self._released, token_ids, self._fresh, self._deadline)
        self._seq += 1
        self._fresh = False
        written = self._publisher.publish(self._reply_to, event, progress)
        if written is not None:  # (test doubles return none)
            self._written = written

    async def wait_written(self) -> None:
        """Returns once this attempt's last event is in Redis (batches go in order); raises
        RedisError if it could not be written."""
        if self._written is not None:
            await asyncio.shield(self._written)

    def started(self, worker_id: str, fingerprint: str) -> None:
        started = codec.Started(worker_id=worker_id, system_fingerprint=fingerprint)
        if self.continued_from is not None:
            started.continued = True
            started.continued_from_tokens = len(self.continued_from.token_ids)
        self._send(codec.Event(started=started))

    def delta(
        self,
        text: str,
        completion_tokens: int,
        token_ids: tuple[int, ...] = (),
        logprobs: tuple[TokenLogprob, ...] = (),
        index: int = 0,
        tool_calls: tuple[ToolCall, ...] = (),
    ) -> None:
        self._choice_tokens[index] = completion_tokens
        self.tokens = sum(self._choice_tokens.values())
        delta = codec.Delta(text=text, completion_tokens=completion_tokens, index=index)
        delta.logprobs.extend(map(_wire_logprob, logprobs))
        delta.tool_calls.extend(
            codec.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in tool_calls
        )
        self._send(codec.Event(delta=delta), token_ids)

    def finished(self, finished: codec.Finished) -> None:
        self.terminal_sent = True
        self.outcome = "finished"
        self.tokens = finished.completion_tokens
        self._send(codec.Event(finished=finished))

    def failed(
        self,
        kind: codec.FailureKind,
        message: str,
        reason: str = "",
        failed_generation: str = "",
        field: str = "",
    ) -> None:
        self.terminal_sent = True
        self.outcome = codec.FailureKind.Name(kind).removeprefix("FAILURE_KIND_").lower()
        failed = codec.Failed(
            kind=kind,
            message=message,
            reason=reason,
            failed_generation=failed_generation,
            field=field,
        )
        self._send(codec.Event(failed=failed))


def _wire_logprob(entry: TokenLogprob) -> codec.TokenLogprob:
    return codec.TokenLogprob(
        token=entry.token,
        logprob=max(entry.logprob, MIN_LOGPROB),
        top_logprobs=[_wire_logprob(t) for t in entry.top],
    )


def sampling_params(job: codec.Job) -> SamplingParams:
    s = job.sampling
    return SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        max_tokens=s.max_tokens,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
        json_mode=s.json_mode,
        json_schema=s.json_schema,
        frequency_penalty=s.frequency_penalty,
        presence_penalty=s.presence_penalty,
        logprobs=s.top_logprobs if s.logprobs else None,
        n=max(1, s.n),
        tools=_tool_use(s.tools) if s.HasField("tools") else None,
    )


def _tool_use(tools: codec.ToolUse) -> ToolUse:
    return ToolUse(tools.definitions, tools.choice, tools.function_name, tools.parallel)


def can_continue(job: codec.Job) -> bool:
    """JSON mode and JSON Schema jobs start over instead: the engine's grammar state cannot be
    restored mid-output, and output continued without it would often not be JSON. So do jobs of
    several choices: the progress record holds one sequence of tokens (theirs interleaved, for
    charging), and jobs with tools, whose reply is published whole at its end. A unary call
    loses only time; a stream that already showed text ends ABORTED (gateway/resume.py)."""
    return (
        not (job.sampling.json_mode or job.sampling.json_schema or job.sampling.HasField("tools"))
        and job.sampling.n <= 1
    )


@dataclass
class _Choice:
    """What the engine generated for one choice in this attempt, as published."""

    text: str = ""  # published by this attempt (JSON mode checks it)
    completion_tokens: int = 0  # including the tokens continued
    finish_reason: str | None = None
    pending: list[int] = field(default_factory=list)  # token ids not published yet (text held back)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)  # theirs, if asked for


@dataclass
class _Generation:
    """What the engine generated for this attempt: its choices, by index."""

    choices: list[_Choice]
    first_token_at: float | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)


async def run_job(
    job: codec.Job,
    engine: Engine,
    events: JobEvents,
    worker_id: str,
    trace_headers: Mapping[str, str] | None = None,
) -> None:
    """Runs the job to its terminal event. Re-raises EngineDead after reporting it.

    Continues the generation when `events.continue_from()` was called with a progress record.
    trace_headers: the attempt's trace context, for the engine to trace under.
    """
    taken_at = time.time()
    events.started(worker_id, engine.fingerprint)
    generated = events.continued_from.token_ids if events.continued_from else ()
    prompt = [*job.prompt_token_ids, *generated]
    params = continued_params(sampling_params(job), len(generated))
    if params.tools is not None and params.tools.choice != "auto":
        # The reply must call tools: decoding follows the calls' schema, as JSON Schema does.
        try:
            params = replace(params, json_mode=True, json_schema=engine.tool_call_schema(params.tools))
        except EngineRejected as exc:
            _cannot_call_tools(events, exc)
            return
    if len(prompt) >= engine.context_window and params.max_tokens > 0:
        # Gateways check this against what workers advertise; a gateway that has not heard
        # of this worker yet may still send one.
        events.failed(
            FailureKind.FAILURE_KIND_INVALID_REQUEST,
            f"make a prompt of {len(job.prompt_token_ids)} tokens, which leaves no room in"
            f" the engine's context window of {engine.context_window} tokens",
            field="messages",
        )
        return
    request = GenerationRequest(
        job.request_id,
        prompt,
        params,
        num_generated=len(generated),
        trace_headers=dict(trace_headers or {}),
        priority=job.priority,
    )
    result = _Generation([_Choice(completion_tokens=len(generated)) for _ in range(params.n)])
    timeout = job.deadline - taken_at if job.deadline else None
    try:
        async with asyncio.timeout(timeout):
            await _generate(engine, request, events, result)
    except TimeoutError:
        n = result.completion_tokens
        events.failed(
            FailureKind.FAILURE_KIND_DEADLINE_EXCEEDED, f"deadline passed after {n} generated tokens"
        )
        return
    except EngineDead:
        # The cause (the engine's own words) goes to the log only; the caller gets the id to quote.
        log.exception("job %s: the engine died", job.request_id)
        events.failed(
            FailureKind.FAILURE_KIND_UNAVAILABLE,
            f"the engine stopped; retry the request (request id {job.request_id})",
        )
        raise
    except EngineUnavailable as exc:
        events.failed(FailureKind.FAILURE_KIND_UNAVAILABLE, f"{exc}; retry the request")
        return
    except EngineRejected as exc:
        events.failed(FailureKind.FAILURE_KIND_INVALID_REQUEST, f"the engine refused the request: {exc}")
        return
    except Exception as exc:
        log.exception("job %s failed", job.request_id)
        # EngineError's words are this worker's own (e.g. repetitive output); any other
        # exception's text may carry internals (paths, addresses), so the caller gets an id instead.
        why = str(exc) if type(exc) is EngineError else "internal error"
        events.failed(
            FailureKind.FAILURE_KIND_INTERNAL,
            f"generation failed: {why} (request id {job.request_id})",
        )
        return
    if not result.finished:
        events.failed(FailureKind.FAILURE_KIND_CANCELLED, "generation was aborted")
        return
    for choice in result.choices:
        subject = _INVALID_CALLS if params.tools is not None else ""
        if violation := output_violation(choice.text, request.params, subject):
            events.failed(
                FailureKind.FAILURE_KIND_INVALID_OUTPUT,
                violation + (" (cut off by max_tokens)" if choice.finish_reason == "length" else ""),
                reason="tool_use_failed" if params.tools is not None else "json_validate_failed",
                failed_generation=choice.text,
            )
            return
    if params.tools is not None and not _publish_with_tools(engine, params.tools, result, events):
        return
    done_at = time.time()
    first_token_at = result.first_token_at or done_at
    finish_reasons = [str(c.finish_reason) for c in result.choices]
    events.finished(
        codec.Finished(
            finish_reason=finish_reasons[0],
            choice_finish_reasons=finish_reasons if len(finish_reasons) > 1 else [],
            prompt_tokens=len(job.prompt_token_ids),
            completion_tokens=result.completion_tokens,
            queue_time=max(0.0, taken_at - job.enqueued_at),
            prompt_time=first_token_at - taken_at,
            completion_time=done_at - first_token_at,
        )
    )


# How a reply that had to call tools, and did not validly, is described to the caller.
_INVALID_CALLS = "the model's tool calls are not valid"


def _cannot_call_tools(events: JobEvents, exc: EngineRejected) -> None:
    events.failed(FailureKind.FAILURE_KIND_INVALID_REQUEST, f"cannot call tools: {exc}", field="tools")


def _publish_with_tools(engine: Engine, tools: ToolUse, result: "_Generation", events: JobEvents) -> bool:
    """Publishes each choice's reply, held back until now: its text, or its tool calls. Every
    choice is read before any is published; one that is no valid calls fails the job instead."""
    replies = []
    for choice in result.choices:
        try:
            replies.append(reply_with_tools(engine, choice.text, tools))
        except InvalidToolCalls as exc:
            events.failed(
                FailureKind.FAILURE_KIND_INVALID_OUTPUT,
                f"{_INVALID_CALLS}: {exc}",
                reason="tool_use_failed",
                failed_generation=choice.text,
            )
            return False
        except EngineRejected as exc:
            _cannot_call_tools(events, exc)
            return False
    for index, (choice, (content, calls)) in enumerate(zip(result.choices, replies, strict=True)):
        if calls and choice.finish_reason == "stop":
            choice.finish_reason = "tool_calls"
        ids, logprobs = tuple(choice.pending), tuple(choice.pending_logprobs)
        events.delta(content, choice.completion_tokens, ids, logprobs, index, tuple(calls))
    return True


def continued_params(params: SamplingParams, num_generated: int) -> SamplingParams:
    """The sampling of a continuation: what is left of max_tokens, its own seed.

    The rest is kept, penalties included; the engine counts them over the tokens the
    continuation generates, not those it continues (worker/engine/vllm.py).
    """
    if not num_generated:
        return params
    seed = None if params.seed is None else (params.seed + num_generated * _SEED_STRIDE) % 2**63
    return replace(params, max_tokens=params.max_tokens - num_generated, seed=seed)


async def _generate(
    engine: Engine, request: GenerationRequest, events: JobEvents, result: _Generation
) -> None:
    """Streams the engine's deltas out as events; sets each choice's finish_reason as it finishes.

    A continuation first publishes the earlier attempts' text that was held back (unless it may
    begin a stop sequence), and looks for stop sequences across the boundary itself: the engine
    sees only the new text. Token ids of deltas without text travel with the next delta published;
    with logprobs, those left at the end go on a last delta without text, so that the caller has
    one log probability per generated token.
    """
    continued = request.num_generated
    stop = StopMatcher(request.params.stop if continued else ())
    if events.continued_from is not None and (
        held := stop.feed(held_back_text(engine, events.continued_from))
    ):
        result.choices[0].text += held
        events.delta(held, continued)  # its tokens are in the progress record already
    deltas = _engine_deltas(engine, request) if request.params.max_tokens > 0 else _nothing_left()
    async with contextlib.aclosing(deltas):
        async for delta in deltas:
            choice = result.choices[delta.index]
            if choice.finish_reason is not None:
                continue  # the engine's iterator ends right after its last delta
            result.first_token_at = result.first_token_at or time.time()
            choice.completion_tokens = continued + delta.completion_tokens
            choice.pending.extend(delta.token_ids)
            choice.pending_logprobs.extend(delta.logprobs)
            # One matcher is enough: it holds text only in a continuation, which has one choice
            # (can_continue); otherwise it has no stop sequences and passes the text through.
            text = stop.feed(delta.text)
            finish = "stop" if stop.matched else delta.finish_reason
            if finish:
                text += stop.flush()
            if request.params.tools is not None:
                # A reply with tools is parsed whole, then published (run_job). Meanwhile its
                # tokens go out without text: the job's progress, what an early end is charged.
                choice.text += text
                if choice.pending:
                    events.delta("", choice.completion_tokens, tuple(choice.pending), (), delta.index)
                    choice.pending = []
            elif text or (finish and choice.pending_logprobs):
                choice.text += text
                ids, logprobs = tuple(choice.pending), tuple(choice.pending_logprobs)
                events.delta(text, choice.completion_tokens, ids, logprobs, delta.index)
                choice.pending, choice.pending_logprobs = [], []
            choice.finish_reason = finish
            if stop.matched and delta.finish_reason is None:
                # A stop sequence across the boundary, which the engine cannot see: end it here.
                await engine.abort(request.request_id)
                return


async def _engine_deltas(engine: Engine, request: GenerationRequest) -> AsyncGenerator[Delta]:
    """The engine's deltas; closing this closes the engine's iterator too (it aborts, if running)."""
    deltas = engine.generate(request)
    try:
        async for delta in deltas:
            yield delta
    finally:
        if (aclose := getattr(deltas, "aclose", None)) is not None:
            await aclose()


async def _nothing_left() -> AsyncGenerator[Delta]:
    """A continuation whose earlier attempts used up max_tokens: it ends at once."""
    yield Delta("", 0, "length")


def held_back_text(engine: Engine, progress: codec.Progress) -> str:
    """The text of the tokens generated so far that was not published yet.

    A trailing replacement character is a token that ends mid-character: the engine's detokenizer
    holds it back too, and completes it with the next token of the continuation.
    """
    return engine.decode(list(progress.token_ids)).rstrip("\ufffd")[progress.released_chars :]
