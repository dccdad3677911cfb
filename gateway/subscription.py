"""The events of one job on their way from the reply reader to the call that waits for them."""

import asyncio
from collections import deque

from common import codec
from gateway.errors import Aborted, ServiceError, Unavailable
from gateway.placement import Affinity
from gateway.tiers import ON_DEMAND


class Subscription:
    """Ordered events of the job's current attempt, with deltas merged while the caller lags.

    An attempt that continues an earlier one (Started.continued) carries on its seq: its
    events follow the earlier attempt's. One that starts over replaces them.

    Merging keeps the backlog of a slow caller at a few events, whatever the engine's pace;
    its text is bounded by the job's max_tokens. A delta merges only into the one queued last,
    of the same choice: with n > 1 choices, whose deltas interleave, a lagging caller's backlog
    is bounded by the tokens (n x max_tokens) instead.

    Each event has a position: its seq, plus the positions used by attempts that started over
    before it, so positions only grow across the job. A merged delta takes the position of the
    last event merged into it. Calls number their chunks with it (`position` after next()), and
    a resumed stream (gateway/completion_log.py) skips what lies at or before its cursor.
    """

    def __init__(self, request_id: str, model: str, max_tokens: int = 0, cursor: int = -1) -> None:
        self.request_id = request_id
        self.model = model
        self.max_tokens = max_tokens  # the most the job can generate, all choices together
        self.choices = 1  # the request's n
        # A resume's starting_after: deltas at or before it are never merged with later ones, or
        # the merged delta (numbered after the cursor) would send the caller's text again.
        self.cursor = cursor
        self.job_stream = ""  # the stream its job was queued on (common/keys.py job_stream)
        self.entry_id = b""  # the job's entry in that stream, once queued
        self.deadline = 0.0  # unix seconds: workers drop the job after it
        self.created = 0  # unix seconds: when the job was queued
        self.affinity: Affinity | None = None  # what placement recorded for it (gateway/placement.py)
        self.ran_on = ""  # the worker of the latest Started event
        self.moving = False  # its entry is being moved between streams (job_stream, entry_id change)
        self.service_tier = ON_DEMAND  # the lane it is queued in: ON_DEMAND or FLEX (gateway/tiers.py)
        self.placed_as = ""  # its placement's outcome (gateway/placement.py), "" where none
        self._events: deque[codec.Event] = deque()
        self._positions: deque[int] = deque()  # of the events queued
        self._offset = 0  # added to seq: an attempt that starts over numbers on after the one before
        self._last_position = -1  # of the last event queued
        self.position = -1  # of the last event next() returned
        self._arrived = asyncio.Event()
        self._attempt = 1
        self._next_seq = 0
        self._ended = False  # a terminal event (Finished or Failed) has been queued
        self._error: ServiceError | None = None

    def deliver(self, event: codec.Event) -> None:
        if self._ended:
            return  # one terminal event per job: a later attempt must not change the reply
        attempt = max(event.attempt, 1)
        if attempt < self._attempt:
            return  # late event of a worker that lost the job
        if attempt > self._attempt:
            self._attempt = attempt
            if event.HasField("started") and event.started.continued:
                # It carries on after the events queued here (the seq checks below hold it to that).
                if event.seq != self._next_seq:
                    self.fail(
                        Unavailable(
                            f"lost contact with the worker: the job was taken over after event"
                            f" {event.seq - 1}, but event {self._next_seq - 1} was the last one received"
                        )
                    )
                    return
            else:
                # It starts over from Started; keeping any event of the old one (a Finished without
                # the deltas before it) would hand the caller a truncated reply.
                if 0 < self.cursor <= self._last_position:
                    # A resume whose caller has text of the old attempt: as on the live path, that
                    # text cannot be continued (gateway/resume.py).
                    self.fail(
                        Aborted(
                            "the worker running this job was lost after text was sent, and the job had"
                            " to start over; retry the request"
                        )
                    )
                    return
                self._next_seq = 0
                self._offset = self._last_position + 1
                self._events.clear()
                self._positions.clear()
        if event.seq < self._next_seq:
            return  # a duplicate
        if event.seq > self._next_seq:
            self.fail(
                Unavailable(f"lost contact with the worker: events {self._next_seq}..{event.seq - 1} missing")
            )
            return
        self._next_seq += 1
        self._ended = event.WhichOneof("kind") in ("finished", "failed")
        self._last_position = self._offset + event.seq
        last = self._events[-1] if self._events else None
        across_cursor = bool(self._positions) and self._positions[-1] <= self.cursor < self._last_position
        if (
            last is not None
            and last.HasField("delta")
            and event.HasField("delta")
            and last.delta.index == event.delta.index
            and not across_cursor
        ):
            last.delta.text += event.delta.text
            last.delta.completion_tokens = event.delta.completion_tokens
            last.delta.logprobs.extend(event.delta.logprobs)
            last.delta.tool_calls.extend(event.delta.tool_calls)
            self._positions[-1] = self._last_position
        else:
            self._events.append(event)
            self._positions.append(self._last_position)
        self._arrived.set()

    @property
    def done(self) -> bool:
        """A terminal event or an error has arrived: nothing more is awaited from Redis."""
        return self._ended or self._error is not None

    def fail(self, error: ServiceError) -> None:
        """Ends the subscription: next() raises error once queued events are consumed."""
        if self._error is None:
            self._error = error
            self._arrived.set()

    async def next(self) -> codec.Event:
        while not self._events:
            if self._error is not None:
                raise self._error
            self._arrived.clear()
            await self._arrived.wait()
        self.position = self._positions.popleft()
        return self._events.popleft()
