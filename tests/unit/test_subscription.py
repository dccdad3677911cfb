"""The per-job event state machine (gateway/subscription.py): attempts, gaps, terminal events."""

import asyncio

import pytest

from common import codec
from gateway.errors import Unavailable
from gateway.subscription import Subscription


def started(attempt: int, seq: int = 0, continued_from_tokens: int | None = None) -> codec.Event:
    """Started of an attempt; with continued_from_tokens, one that continues the earlier attempt."""
    s = codec.Started(worker_id="w")
    if continued_from_tokens is not None:
        s.continued, s.continued_from_tokens = True, continued_from_tokens
    return codec.Event(request_id="r", seq=seq, attempt=attempt, started=s)


def delta(attempt: int, seq: int, text: str, tokens: int) -> codec.Event:
    return codec.Event(
        request_id="r", seq=seq, attempt=attempt, delta=codec.Delta(text=text, completion_tokens=tokens)
    )


def finished(attempt: int, seq: int, tokens: int) -> codec.Event:
    return codec.Event(
        request_id="r",
        seq=seq,
        attempt=attempt,
        finished=codec.Finished(finish_reason="length", completion_tokens=tokens),
    )


async def unary_reply(subscription: Subscription) -> tuple[str, int]:
    """What a unary call builds from the events: text since the last Started, and the token count."""
    pieces: list[str] = []
    while True:
        event = await asyncio.wait_for(subscription.next(), 1)
        if event.HasField("started") and not event.started.continued:
            pieces.clear()
        elif event.HasField("delta"):
            pieces.append(event.delta.text)
        elif event.HasField("finished"):
            return "".join(pieces), event.finished.completion_tokens


async def test_a_slow_reader_gets_the_whole_reply_when_a_rerun_starts_after_finished() -> None:
    subscription = Subscription("r", "m")
    for event in (started(1), delta(1, 1, "a ", 1), delta(1, 2, "b ", 2), finished(1, 3, 2)):
        subscription.deliver(event)
    # The job's worker froze after its Finished event, and another worker re-runs the job.
    subscription.deliver(started(2))
    subscription.deliver(delta(2, 1, "a ", 1))
    assert await unary_reply(subscription) == ("a b ", 2)


async def test_a_rerun_before_the_end_replaces_the_older_attempt_entirely() -> None:
    subscription = Subscription("r", "m")
    for event in (started(1), delta(1, 1, "a ", 1)):
        subscription.deliver(event)
    for event in (started(2), delta(2, 1, "a ", 1), delta(2, 2, "b ", 2), finished(2, 3, 2)):
        subscription.deliver(event)
    assert await unary_reply(subscription) == ("a b ", 2)


async def test_late_events_of_an_older_attempt_are_ignored() -> None:
    subscription = Subscription("r", "m")
    subscription.deliver(started(2))
    subscription.deliver(delta(1, 1, "stale", 1))
    for event in (delta(2, 1, "a ", 1), finished(2, 2, 1)):
        subscription.deliver(event)
    assert await unary_reply(subscription) == ("a ", 1)


async def test_a_gap_in_sequence_numbers_fails_the_call() -> None:
    subscription = Subscription("r", "m")
    subscription.deliver(started(1))
    subscription.deliver(delta(1, 2, "b", 2))  # seq 1 was lost
    assert (await subscription.next()).HasField("started")
    with pytest.raises(Unavailable, match=r"events 1\.\.1 missing"):
        await subscription.next()


async def test_a_continuation_carries_on_after_the_events_already_received() -> None:
    subscription = Subscription("r", "m")
    for event in (started(1), delta(1, 1, "a ", 1), delta(1, 2, "b ", 2)):
        subscription.deliver(event)
    # The worker died; another one took the job over and continues after event 2 and token 2.
    for event in (started(2, 3, continued_from_tokens=2), delta(2, 4, "c ", 3), finished(2, 5, 3)):
        subscription.deliver(event)
    assert await unary_reply(subscription) == ("a b c ", 3)


async def test_a_continuation_that_does_not_follow_the_last_event_received_fails_the_call() -> None:
    subscription = Subscription("r", "m")
    for event in (started(1), delta(1, 1, "a ", 1)):
        subscription.deliver(event)
    subscription.deliver(started(2, 3, continued_from_tokens=2))  # event 2 never arrived
    for _ in range(2):
        await subscription.next()
    with pytest.raises(Unavailable, match="taken over after event 2"):
        await subscription.next()


def with_logprobs(event: codec.Event, *tokens: str) -> codec.Event:
    event.delta.logprobs.extend(codec.TokenLogprob(token=t, logprob=-1.0) for t in tokens)
    return event


async def test_merged_deltas_keep_every_logprob_in_order() -> None:
    subscription = Subscription("r", "m")
    subscription.deliver(started(1))
    subscription.deliver(with_logprobs(delta(1, 1, "a", 1), "a"))
    subscription.deliver(with_logprobs(delta(1, 2, "bc", 3), "b", "c"))
    subscription.deliver(with_logprobs(delta(1, 3, "", 4), "</s>"))  # a last token without text
    assert (await subscription.next()).HasField("started")
    merged = (await subscription.next()).delta
    assert (merged.text, merged.completion_tokens) == ("abc", 4)
    assert [entry.token for entry in merged.logprobs] == ["a", "b", "c", "</s>"]


async def test_merged_deltas_keep_the_tool_calls_of_the_last() -> None:
    subscription = Subscription("r", "m")
    subscription.deliver(started(1))
    subscription.deliver(delta(1, 1, "", 2))  # a reply with tools: its tokens come without text
    last = delta(1, 2, "", 3)
    last.delta.tool_calls.add(id="call_1", name="f", arguments="{}")
    subscription.deliver(last)
    assert (await subscription.next()).HasField("started")
    merged = (await subscription.next()).delta
    assert merged.completion_tokens == 3 and [c.id for c in merged.tool_calls] == ["call_1"]


async def test_deltas_of_different_choices_are_never_merged() -> None:
    subscription = Subscription("r", "m")
    second = delta(1, 2, "x", 1)
    second.delta.index = 1
    for event in (started(1), delta(1, 1, "a", 1), second, delta(1, 3, "b", 2)):
        subscription.deliver(event)
    events = [await subscription.next() for _ in range(4)]
    assert [(e.delta.index, e.delta.text) for e in events[1:]] == [(0, "a"), (1, "x"), (0, "b")]
