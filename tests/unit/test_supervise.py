"""A background task that fails by a bug is logged with its traceback and runs again."""

import asyncio

import pytest

from common.supervise import supervised


async def test_a_task_that_raises_is_logged_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    runs = 0
    again = asyncio.Event()

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise KeyError("a bug")
        again.set()
        await asyncio.Event().wait()

    task = supervised("flaky", loop, delay=0.01)
    await asyncio.wait_for(again.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert runs == 2
    [record] = [r for r in caplog.records if "flaky" in r.getMessage()]
    assert record.exc_info is not None and isinstance(record.exc_info[1], KeyError)


async def test_a_task_being_cancelled_is_not_restarted_whatever_it_raises() -> None:
    runs = 0

    async def loop() -> None:
        nonlocal runs
        runs += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("a cancel turned into another error") from None

    task = supervised("stopping", loop, delay=0.01)
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(task, 1)
    assert runs == 1
