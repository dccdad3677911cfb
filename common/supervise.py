"""Background loops that outlive a bug: logged with their traceback, then restarted.

The gateway's loops (reply reader, reply-stream keepalive, health watch, lost-job check) and
the worker's (the watch on running jobs, the heartbeat) each catch the Redis errors they
expect. Anything else would end the task silently, and with it routing, the reply stream,
the health status or, in a worker, the heartbeat (every job it runs would then be taken over
by other workers) for good. Restarting is chosen over exiting the process: every loop
rebuilds its state when it starts, while an exit would end every call or job in flight, for
a fault in one helper.
"""

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

RESTART_DELAY_SECONDS = 1.0  # a loop that fails at once must not spin


def supervised(
    name: str, loop: Callable[[], Coroutine[Any, Any, None]], delay: float = RESTART_DELAY_SECONDS
) -> asyncio.Task[None]:
    """Runs loop() as a task named `name`; whenever it ends by an exception it runs again."""
    return asyncio.create_task(_keep_running(name, loop, delay), name=name)


async def _keep_running(name: str, loop: Callable[[], Coroutine[Any, Any, None]], delay: float) -> None:
    task = asyncio.current_task()
    while True:
        try:
            await loop()
            log.error("background task %s returned; restarting it", name)
        except Exception:
            if task is not None and task.cancelling():
                raise  # being stopped: a cancel that a library turned into another error ends it too
            log.exception("background task %s failed; restarting it in %.1fs", name, delay)
        await asyncio.sleep(delay)


def being_cancelled() -> bool:
    """Whether the running task is being cancelled: a loop that catches Redis errors must re-raise
    then, since redis-py can turn a cancel during a read into a ConnectionError."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
