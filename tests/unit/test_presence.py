"""Calls for a model without a live worker: held within the grace, refused after it, or queued."""

import asyncio
import time

import pytest

from gateway.errors import DeadlineExceeded, Unavailable
from gateway.presence import NoLiveWorker, WorkerPresence


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def far() -> float:
    return time.time() + 60


async def test_a_model_without_a_worker_past_the_grace_is_refused_at_once() -> None:
    clock = Clock()
    presence = WorkerPresence(["m"], "refuse", grace_seconds=10, clock=clock)
    clock.now += 11
    with pytest.raises(NoLiveWorker, match="no worker serving model 'm'") as caught:
        await asyncio.wait_for(presence.admit("m", far()), 1)
    assert isinstance(caught.value, Unavailable)


async def test_a_live_model_is_admitted_and_a_call_in_the_grace_waits_for_a_worker() -> None:
    clock = Clock()
    presence = WorkerPresence(["m"], "refuse", grace_seconds=10, clock=clock)
    presence.observe("m", True)
    await asyncio.wait_for(presence.admit("m", far()), 1)
    presence.observe("m", False)
    clock.now += 5  # within the grace: held until a worker shows up
    waiting = asyncio.create_task(presence.admit("m", far()))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    presence.observe("m", True)
    await asyncio.wait_for(waiting, 1)


async def test_a_call_whose_deadline_passes_in_the_grace_ends_deadline_exceeded() -> None:
    presence = WorkerPresence(["m"], "refuse", grace_seconds=10, clock=Clock())
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(presence.admit("m", time.time() + 0.05), 1)


async def test_the_queue_policy_always_admits() -> None:
    clock = Clock()
    presence = WorkerPresence(["m"], "queue", grace_seconds=10, clock=clock)
    clock.now += 1000
    await asyncio.wait_for(presence.admit("m", far()), 1)


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="refuse"):
        WorkerPresence(["m"], "wait", grace_seconds=10)
