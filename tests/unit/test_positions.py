"""Positions of a job's events (gateway/subscription.py): the numbers streams send as chunk ids.

A caller resumes "after position N" (gateway/completion_log.py), so positions must only grow
along a job, whatever happens to its attempts, and a chunk made of merged deltas must carry
the position of the last delta in it: resuming after it must not send that text again.
"""

import asyncio

import pytest

from common import codec
from gateway.errors import Aborted
from gateway.subscription import Subscription


def started(attempt: int, seq: int = 0, continued: bool = False) -> codec.Event:
    s = codec.Started(worker_id="w", continued=continued, continued_from_tokens=seq - 1 if continued else 0)
    return codec.Event(request_id="r", seq=seq, attempt=attempt, started=s)


def delta(attempt: int, seq: int, text: str) -> codec.Event:
    return codec.Event(
        request_id="r", seq=seq, attempt=attempt, delta=codec.Delta(text=text, completion_tokens=seq)
    )


def finished(attempt: int, seq: int) -> codec.Event:
    return codec.Event(
        request_id="r", seq=seq, attempt=attempt, finished=codec.Finished(finish_reason="stop")
    )


async def read(subscription: Subscription) -> tuple[str, int]:
    """The next event's kind (a delta: its text) and the position next() gave it."""
    event = await asyncio.wait_for(subscription.next(), 1)
    kind = event.delta.text if event.HasField("delta") else str(event.WhichOneof("kind"))
    return kind, subscription.position


async def test_positions_grow_with_the_events_read_one_at_a_time() -> None:
    subscription = Subscription("r", "m")
    assert subscription.position == -1  # nothing read yet: resuming after -1 is "from the start"
    read_back = []
    for event in (started(1), delta(1, 1, "a"), delta(1, 2, "b"), finished(1, 3)):
        subscription.deliver(event)
        read_back.append(await read(subscription))
    assert read_back == [("started", 0), ("a", 1), ("b", 2), ("finished", 3)]


async def test_merged_deltas_take_the_position_of_the_last_one() -> None:
    subscription = Subscription("r", "m")
    # The caller lags: three deltas arrive before it reads, and reach it as one.
    for event in (started(1), delta(1, 1, "a"), delta(1, 2, "b"), delta(1, 3, "c"), finished(1, 4)):
        subscription.deliver(event)
    assert [await read(subscription) for _ in range(3)] == [("started", 0), ("abc", 3), ("finished", 4)]


async def test_a_duplicate_event_takes_no_position() -> None:
    subscription = Subscription("r", "m")
    for event in (started(1), delta(1, 1, "a")):
        subscription.deliver(event)
        await read(subscription)
    subscription.deliver(delta(1, 1, "a"))  # published twice (a retried write)
    subscription.deliver(delta(1, 2, "b"))
    assert await read(subscription) == ("b", 2)


async def test_an_attempt_that_starts_over_numbers_on_after_the_last_position() -> None:
    subscription = Subscription("r", "m")
    for event in (started(1), delta(1, 1, "a"), delta(1, 2, "b")):
        subscription.deliver(event)
        await read(subscription)
    # Another worker runs the job again from its start: its seq begins at 0 again, its positions
    # must not, or a caller that read up to 2 would skip the new attempt's first events.
    read_back = []
    for event in (started(2), delta(2, 1, "a"), finished(2, 2)):
        subscription.deliver(event)
        read_back.append(await read(subscription))
    assert read_back == [("started", 3), ("a", 4), ("finished", 5)]


async def test_an_attempt_that_starts_over_unread_numbers_on_after_what_was_queued() -> None:
    subscription = Subscription("r", "m")
    for event in (started(1), delta(1, 1, "a"), delta(1, 2, "b")):
        subscription.deliver(event)  # queued, never read: the new attempt replaces them
    for event in (started(2), delta(2, 1, "x")):
        subscription.deliver(event)
    assert [await read(subscription) for _ in range(2)] == [("started", 3), ("x", 4)]


async def test_a_continued_attempt_keeps_the_seq_as_its_position() -> None:
    subscription = Subscription("r", "m")
    for event in (started(1), delta(1, 1, "a"), delta(1, 2, "b")):
        subscription.deliver(event)
        await read(subscription)
    # Another worker carries on after event 2: its events follow on, numbered as one job.
    read_back = []
    for event in (started(2, seq=3, continued=True), delta(2, 4, "c"), finished(2, 5)):
        subscription.deliver(event)
        read_back.append(await read(subscription))
    assert read_back == [("started", 3), ("c", 4), ("finished", 5)]


async def test_deltas_on_either_side_of_a_resumes_cursor_are_not_merged() -> None:
    # A resume reads the log's backlog at once; had "a" and "b" been merged at position 2, the
    # caller that saw up to 1 (its "a") would be sent "ab", its "a" a second time.
    subscription = Subscription("r", "m", cursor=1)
    for event in (started(1), delta(1, 1, "a"), delta(1, 2, "b"), delta(1, 3, "c"), finished(1, 4)):
        subscription.deliver(event)
    read_back = [await read(subscription) for _ in range(4)]
    assert read_back == [("started", 0), ("a", 1), ("bc", 3), ("finished", 4)]


async def test_a_resume_into_text_of_an_attempt_that_started_over_is_aborted() -> None:
    # The caller read up to the delta at 2 of attempt 1; the log then holds attempt 2 from its
    # start. Its text cannot continue the caller's: ABORTED, as on the live path, not a reply
    # that repeats (or contradicts) what the caller has.
    subscription = Subscription("r", "m", cursor=2)
    for event in (started(1), delta(1, 1, "a"), delta(1, 2, "b"), started(2), delta(2, 1, "x")):
        subscription.deliver(event)
    with pytest.raises(Aborted):
        for _ in range(4):
            await read(subscription)


async def test_a_resume_past_an_attempt_that_started_over_goes_on() -> None:
    # The caller's cursor (3) lies in attempt 2 already: nothing of attempt 1 is its text.
    subscription = Subscription("r", "m", cursor=3)
    events = (started(1), delta(1, 1, "a"), started(2), delta(2, 1, "x"), delta(2, 2, "y"))
    for event in events:
        subscription.deliver(event)
    assert [await read(subscription) for _ in range(2)] == [("started", 2), ("x", 3)]
    assert await read(subscription) == ("y", 4)
