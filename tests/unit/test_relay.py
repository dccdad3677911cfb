"""The shared call path (gateway/relay.py) with fake queue, keys and rate limiter: no Redis, no model."""

import asyncio
import dataclasses
from collections.abc import Sequence

import pytest

from chat.v1 import chat_pb2
from common import codec
from common.models import Message
from gateway.apikeys import KeyRecord
from gateway.catalog import ModelCatalog, ServedModel
from gateway.config import GatewaySettings
from gateway.errors import (
    Aborted,
    DeadlineExceeded,
    InvalidField,
    QueueFull,
    ServiceError,
    TooManyCalls,
    Unavailable,
)
from gateway.ratelimit import Budget
from gateway.relay import Accepted, Caller, Failed, Finished, Item, Relay, Text
from gateway.subscription import Subscription
from gateway.validation import ValidRequest
from gateway.wait_estimate import WaitEstimator

MODEL = "SmolLM2-135M-Instruct"  # the default GATEWAY_MODELS, rendered here by a fake
KEY = KeyRecord("k", ("*",), requests_per_minute=0, tokens_per_minute=1000, revoked=False, digest="d")


class OneTokenPerChar:
    context_window = 4096
    supports_tools = False

    def render(self, messages: list[Message], tools: object = ()) -> list[int]:
        return [1] * sum(len(m.content) for m in messages)


def answer() -> list[codec.Event]:
    """Started, one delta and Finished, from attempt 1."""
    return [
        codec.Event(started=codec.Started(system_fingerprint="fp")),
        codec.Event(delta=codec.Delta(text="hi", completion_tokens=1)),
        codec.Event(finished=codec.Finished(finish_reason="stop", prompt_tokens=2, completion_tokens=1)),
    ]


class FakeQueue:
    """Answers every job at once with the given events (numbered per attempt); or fails submit."""

    def __init__(
        self,
        error: ServiceError | None = None,
        submit_seconds: float = 0.0,
        events: list[list[codec.Event]] | None = None,
    ) -> None:
        self.error = error
        self.submit_seconds = submit_seconds
        self.attempts = events or [answer()]  # the events of attempt 1, 2, ...
        self.released: list[str] = []
        self.submitted: list[ValidRequest] = []
        self.in_record = 0  # tokens the job's progress record holds when the call ends
        self.waits = WaitEstimator()  # told each finished job's engine time

    async def generated_tokens(self, request_id: str) -> int:
        return self.in_record

    async def submit(self, request: ValidRequest, deadline: float, owner: str = "anonymous") -> Subscription:
        self.submitted.append(request)
        await asyncio.sleep(self.submit_seconds)
        if self.error is not None:
            raise self.error
        subscription = Subscription(f"id{len(self.released)}", request.model, request.max_tokens * request.n)
        subscription.choices = request.n
        self._deliver(subscription, 1)
        # Later attempts come after the call has taken in the first one's events, as when a worker dies.
        loop = asyncio.get_running_loop()
        for attempt in range(2, len(self.attempts) + 1):
            loop.call_later(0.02 * attempt, self._deliver, subscription, attempt)
        return subscription

    def _deliver(self, subscription: Subscription, attempt: int) -> None:
        events = self.attempts[attempt - 1]
        continued = bool(events) and events[0].HasField("started") and events[0].started.continued
        seq = sum(len(a) for a in self.attempts[: attempt - 1]) if continued else 0
        for template in events:
            event = codec.Event()
            event.CopyFrom(template)  # the subscription merges deltas into the events it holds
            event.request_id, event.seq, event.attempt = subscription.request_id, seq, attempt
            subscription.deliver(event)
            seq += 1

    def release(self, subscription: Subscription, cancel_until: float | None = None) -> None:
        self.released.append(subscription.request_id)


class FakeAuthenticator:
    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]], model: str) -> KeyRecord:
        return KEY


class FakeRateLimiter:
    def __init__(self) -> None:
        self.reserved = 0
        self.requests = 0

    async def admit(self, record: KeyRecord, tokens: int) -> Budget:
        self.reserved += tokens
        self.requests += 1
        return Budget(record, 0, self.requests, self.reserved, 60.0, tokens)

    async def refund(self, budget: Budget, tokens: int, requests: int = 0) -> None:
        self.reserved -= tokens
        self.requests -= requests

    async def check_requests(self, record: KeyRecord) -> None:
        pass


def make_relay(queue: FakeQueue, limiter: FakeRateLimiter | None = None, **settings: object) -> Relay:
    base = GatewaySettings.from_env({"GATEWAY_DEFAULT_MAX_TOKENS": "100"})
    gateway_settings = dataclasses.replace(base, **settings)  # type: ignore[arg-type]
    served = [ServedModel(MODEL, OneTokenPerChar(), 4096, 0)]  # type: ignore[arg-type]
    catalog = ModelCatalog(served, gateway_settings.aliases)
    auth = FakeAuthenticator() if limiter is not None else None
    return Relay(gateway_settings, catalog, queue, auth, limiter)  # type: ignore[arg-type]


def request(content: str = "hi", **fields: object) -> chat_pb2.ChatCompletionRequest:
    return chat_pb2.ChatCompletionRequest(
        model=MODEL, messages=[chat_pb2.ChatMessage(role="user", content=content)], **fields
    )


async def run(relay: Relay, req: chat_pb2.ChatCompletionRequest, stream: bool = False) -> list[Item]:
    return [item async for item in relay.run(req, Caller((), None), stream=stream)]


async def test_a_call_yields_accepted_text_and_finished() -> None:
    items = await run(make_relay(FakeQueue()), request())
    assert isinstance(items[0], Accepted) and items[0].completion_id == "chatcmpl-id0"
    assert [i.text for i in items if isinstance(i, Text)] == ["hi"]
    assert isinstance(items[-1], Finished) and items[-1].usage.total_tokens == 3


async def test_a_finished_call_tells_the_wait_estimate_its_engine_time() -> None:
    finished = codec.Finished(
        finish_reason="stop", prompt_tokens=2, completion_tokens=1, prompt_time=0.5, completion_time=1.5
    )
    queue = FakeQueue(events=[[*answer()[:2], codec.Event(finished=finished)]])
    queue.waits.set_capacity(MODEL, 1)
    await run(make_relay(queue), request())
    assert queue.waits.wait_seconds(MODEL, 1) == pytest.approx(2.0)


async def test_a_burst_cannot_pass_the_open_calls_limit() -> None:
    # Submitting takes a while (a Redis round trip): every call of the burst is admitted meanwhile.
    relay = make_relay(FakeQueue(submit_seconds=0.05), max_concurrent_calls=2)
    results = await asyncio.gather(*(run(relay, request()) for _ in range(5)))
    refused = [r for r in results if isinstance(r[-1], Failed) and isinstance(r[-1].error, TooManyCalls)]
    assert len(refused) == 3 and sum(isinstance(r[-1], Finished) for r in results) == 2
    assert relay.open_calls == 0


@pytest.mark.parametrize("error", [QueueFull(MODEL, 9), Unavailable("job queue unreachable")])
async def test_tokens_reserved_for_a_call_that_could_not_be_queued_are_refunded(error: ServiceError) -> None:
    limiter = FakeRateLimiter()
    items = await run(make_relay(FakeQueue(error), limiter), request(max_tokens=10))
    assert isinstance(items[-1], Failed) and items[-1].error is error
    assert limiter.reserved == 0 and limiter.requests == 0  # the overload costs no request either


async def test_a_finished_call_is_charged_what_it_used() -> None:
    limiter = FakeRateLimiter()
    await run(make_relay(FakeQueue(), limiter), request(max_tokens=10))
    assert limiter.reserved == 2 + 1  # prompt + generated, not prompt + max_tokens


@pytest.mark.parametrize("in_record", [0, 5])
async def test_a_call_its_caller_leaves_is_charged_what_was_generated(in_record: int) -> None:
    # Two tokens received; the progress record may be ahead (events in flight, or lost).
    limiter, queue = FakeRateLimiter(), FakeQueue(events=[TAKEN_OVER_AFTER_TWO_TOKENS])
    queue.in_record = in_record
    calls = make_relay(queue, limiter).run(request(max_tokens=500), Caller((), None), stream=True)
    async for item in calls:
        if isinstance(item, Text):  # both deltas, merged while the call had not read them
            break
    await calls.aclose()
    assert limiter.reserved == 2 + max(2, in_record) and limiter.requests == 1


async def test_a_call_whose_job_never_reached_a_worker_gives_back_request_and_tokens() -> None:
    limiter = FakeRateLimiter()
    relay = make_relay(FakeQueue(events=[[]]), limiter)
    items = [item async for item in relay.run(request(max_tokens=500), Caller((), 0.1), stream=False)]
    assert isinstance(items[-1], Failed) and isinstance(items[-1].error, DeadlineExceeded)
    assert limiter.reserved == 0 and limiter.requests == 0


async def test_a_default_max_tokens_is_lowered_to_what_the_keys_tpm_leaves() -> None:
    # KEY allows 1,000 tokens per minute; the default (5,000) would make the request invalid.
    queue = FakeQueue()
    items = await run(make_relay(queue, FakeRateLimiter(), default_max_tokens=5000), request())
    assert isinstance(items[-1], Finished) and queue.submitted[0].max_tokens == 1000 - 2


async def test_a_request_larger_than_the_keys_tpm_is_refused_for_good() -> None:
    # KEY allows 1,000 tokens per minute: waiting for the window to reset would never help.
    limiter = FakeRateLimiter()
    items = await run(make_relay(FakeQueue(), limiter), request(max_tokens=1500))
    error = items[-1].error if isinstance(items[-1], Failed) else None
    assert isinstance(error, InvalidField) and error.field == "max_tokens"
    assert "1000 tokens per minute" in error.message and "max_tokens 1500" in error.message
    assert not error.details() or "RetryInfo" not in str(error.details())
    assert limiter.reserved == 0


async def test_an_alias_reaches_the_served_model_and_responses_name_it() -> None:
    relay = make_relay(FakeQueue(), model_aliases=(("mixtral-8x7b-32768", MODEL),))
    items = await run(relay, chat_pb2.ChatCompletionRequest(
        model="mixtral-8x7b-32768", messages=[chat_pb2.ChatMessage(role="user", content="hi")]
    ))  # fmt: skip
    assert isinstance(items[0], Accepted) and items[0].model == MODEL
    assert isinstance(items[-1], Finished)


def started(continued_from_tokens: int | None = None) -> codec.Event:
    s = codec.Started(system_fingerprint="fp")
    if continued_from_tokens is not None:
        s.continued, s.continued_from_tokens = True, continued_from_tokens
    return codec.Event(started=s)


def delta(text: str, tokens: int) -> codec.Event:
    return codec.Event(delta=codec.Delta(text=text, completion_tokens=tokens))


def finished(tokens: int) -> codec.Event:
    return codec.Event(
        finished=codec.Finished(finish_reason="length", prompt_tokens=2, completion_tokens=tokens)
    )


TAKEN_OVER_AFTER_TWO_TOKENS = [started(), delta("a ", 1), delta("b ", 2)]


@pytest.mark.parametrize("stream", [True, False])
async def test_a_job_taken_over_continues_the_reply_without_repeating_it(stream: bool) -> None:
    continuation = [started(continued_from_tokens=2), delta("c ", 3), finished(3)]
    items = await run(
        make_relay(FakeQueue(events=[TAKEN_OVER_AFTER_TWO_TOKENS, continuation])), request(), stream
    )
    text = [i.text for i in items if isinstance(i, Text)]
    assert text == (["a b ", "c "] if stream else ["a b c "])  # a stream's first two deltas were merged
    assert isinstance(items[-1], Finished) and items[-1].usage.completion_tokens == 3


async def test_a_stream_whose_job_starts_over_after_text_was_sent_ends_aborted() -> None:
    rerun = [started(), delta("a ", 1), finished(1)]
    items = await run(make_relay(FakeQueue(events=[TAKEN_OVER_AFTER_TWO_TOKENS, rerun])), request(), True)
    assert isinstance(items[-1], Failed) and isinstance(items[-1].error, Aborted)
    assert "after 2 tokens were sent" in items[-1].error.message


async def test_a_unary_call_whose_job_starts_over_gets_the_new_attempts_reply() -> None:
    rerun = [started(), delta("x ", 1), finished(1)]
    items = await run(make_relay(FakeQueue(events=[TAKEN_OVER_AFTER_TWO_TOKENS, rerun])), request())
    assert [i.text for i in items if isinstance(i, Text)] == ["x "]
    assert isinstance(items[-1], Finished) and items[-1].usage.completion_tokens == 1


async def test_a_continuation_from_other_tokens_than_received_ends_aborted() -> None:
    continuation = [started(continued_from_tokens=1), delta("b ", 2), finished(2)]
    items = await run(
        make_relay(FakeQueue(events=[TAKEN_OVER_AFTER_TWO_TOKENS, continuation])), request(), True
    )
    assert isinstance(items[-1], Failed) and isinstance(items[-1].error, Aborted)
    assert "1 tokens where 2 were received" in items[-1].error.message


def scored(text: str, tokens: int, *pieces: str) -> codec.Event:
    """A delta whose tokens' logprobs are given (a last delta may have tokens and no text)."""
    event = delta(text, tokens)
    event.delta.logprobs.extend(codec.TokenLogprob(token=t, logprob=-0.25) for t in pieces)
    return event


@pytest.mark.parametrize("stream", [True, False])
async def test_logprobs_continue_across_a_takeover_one_per_token(stream: bool) -> None:
    first = [started(), scored("a ", 1, "a "), scored("b ", 2, "b ")]
    continuation = [
        started(continued_from_tokens=2),
        scored("c ", 3, "c "),
        scored("", 4, "<eos>"),
        finished(4),
    ]
    items = await run(make_relay(FakeQueue(events=[first, continuation])), request(), stream)
    texts = [i for i in items if isinstance(i, Text)]
    assert [t.token for i in texts for t in i.logprobs] == ["a ", "b ", "c ", "<eos>"]
    assert "".join(i.text for i in texts) == "a b c "
    assert isinstance(items[-1], Finished) and items[-1].usage.completion_tokens == 4


async def test_a_unary_call_whose_job_starts_over_keeps_only_the_new_attempts_logprobs() -> None:
    first = [started(), scored("a ", 1, "a "), scored("b ", 2, "b ")]
    rerun = [started(), scored("x ", 1, "x "), finished(1)]
    items = await run(make_relay(FakeQueue(events=[first, rerun])), request())
    [text] = [i for i in items if isinstance(i, Text)]
    assert (text.text, [t.token for t in text.logprobs]) == ("x ", ["x "])


def of_choice(index: int, event: codec.Event) -> codec.Event:
    event.delta.index = index
    return event


@pytest.mark.parametrize("stream", [True, False])
async def test_n_choices_come_apart_by_index_each_with_its_finish_reason(stream: bool) -> None:
    end = codec.Finished(finish_reason="stop", prompt_tokens=2, completion_tokens=3)
    end.choice_finish_reasons.extend(["stop", "length"])
    events = [
        started(),
        of_choice(0, delta("a", 1)),
        of_choice(1, delta("x", 1)),
        of_choice(0, scored("b", 2, "b")),
        of_choice(1, delta("y", 2)),
        codec.Event(finished=end),
    ]
    items = await run(make_relay(FakeQueue(events=[events])), request(n=2, max_tokens=2), stream)
    assert isinstance(items[0], Accepted) and items[0].choices == 2
    texts = [(i.index, i.text, [t.token for t in i.logprobs]) for i in items if isinstance(i, Text)]
    if stream:  # each choice's deltas in order, never merged across choices
        assert texts == [(0, "a", []), (1, "x", []), (0, "b", ["b"]), (1, "y", [])]
    else:
        assert texts == [(0, "ab", ["b"]), (1, "xy", [])]
    finished = items[-1]
    assert isinstance(finished, Finished) and finished.finish_reasons == ("stop", "length")
    assert [finished.finish_reason_of(i) for i in (0, 1)] == ["stop", "length"]
    assert finished.usage.completion_tokens == 3


async def test_a_stream_that_forwarded_only_logprobs_cannot_start_over_either() -> None:
    # Choice 0 ended on a token without text (its stop sequence); its entry reached the caller.
    first = [started(), scored("", 1, "\n")]
    rerun = [started(), scored("a", 1, "a"), finished(1)]
    items = await run(make_relay(FakeQueue(events=[first, rerun])), request(), True)
    assert isinstance(items[-1], Failed) and isinstance(items[-1].error, Aborted)


async def test_a_job_that_came_back_with_fewer_choices_than_asked_fails_instead_of_making_them_up() -> None:
    # A worker older than n > 1 ignores it and generates one choice.
    events = [started(), delta("a", 1), finished(1)]
    items = await run(make_relay(FakeQueue(events=[events])), request(n=2))
    assert isinstance(items[-1], Failed) and isinstance(items[-1].error, Unavailable)
    assert "generated 1 of the 2 choices" in items[-1].error.message


async def test_a_key_budget_counts_max_tokens_once_per_choice() -> None:
    # KEY allows 1,000 tokens per minute; the prompt is 2.
    queue = FakeQueue()
    await run(make_relay(queue, FakeRateLimiter(), default_max_tokens=5000), request(n=4))
    assert queue.submitted[0].max_tokens == (1000 - 2) // 4  # a default shrinks to fit all choices
    items = await run(make_relay(FakeQueue(), FakeRateLimiter()), request(n=3, max_tokens=400))
    assert isinstance(items[-1], Failed) and isinstance(items[-1].error, InvalidField)
    assert items[-1].error.field == "n"
    assert "prompt 2 + max_tokens 400 x n 3 tokens exceed" in items[-1].error.message


async def test_a_deadline_that_passes_while_the_transport_writes_still_ends_the_call_with_its_status() -> (
    None
):
    # The job streams one delta and then nothing more; the caller's transport is slow to write it.
    started_and_text = answer()[:2]
    relay = make_relay(FakeQueue(events=[started_and_text]))
    items: list[Item] = []
    async for item in relay.run(request(), Caller((), 0.2), stream=True):
        items.append(item)
        if isinstance(item, Text):
            await asyncio.sleep(0.4)  # a write blocked by a slow reader, past the deadline
    assert isinstance(items[-1], Failed) and isinstance(items[-1].error, DeadlineExceeded)
