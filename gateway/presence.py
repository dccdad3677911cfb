"""Whether a live worker serves each model, and what a call for a model without one gets.

Workers advertise their engines while alive (common/engine_registry.py); the gateway's
health tick reads that and tells this module. A model with no live worker is either
refused or queued, by GATEWAY_NO_WORKER:

- `refuse` (default): once the model has had no live worker for GATEWAY_NO_WORKER_GRACE_SECONDS,
  calls end UNAVAILABLE / HTTP 503 at once instead of waiting in the queue to their deadline.
  Within the grace (a worker restarting, a missed heartbeat, a gateway just started) a call
  waits for a worker, up to the rest of the grace, before its job is queued.
- `queue`: jobs are queued as ever, for deployments that scale workers to zero on purpose
  (KEDA starts a worker when jobs wait).
"""

import asyncio
import time
from collections.abc import Callable, Iterable

from gateway.errors import DeadlineExceeded, Unavailable

POLICIES = ("refuse", "queue")


class NoLiveWorker(Unavailable):
    def __init__(self, model: str, seconds: float) -> None:
        super().__init__(f"no worker serving model {model!r} has been live for {seconds:.0f}s; retry later")


class WorkerPresence:
    def __init__(
        self,
        models: Iterable[str],
        policy: str,
        grace_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"no-worker policy must be one of {POLICIES}, got {policy!r}")
        self._policy = policy
        self._grace = grace_seconds
        self._clock = clock
        now = clock()
        self._live = dict.fromkeys(models, False)
        self._last_live = dict.fromkeys(models, now)  # start counts as seen: the grace runs from it
        self._changed = asyncio.Event()

    def observe(self, model: str, live: bool) -> None:
        """What the registry says now about the model's workers."""
        self._live[model] = live
        if live:
            self._last_live[model] = self._clock()
            self._changed.set()

    def is_live(self, model: str) -> bool:
        return self._live.get(model, False)

    async def admit(self, model: str, deadline: float) -> None:
        """Returns when the model's job may be queued; raises NoLiveWorker under `refuse` once the
        grace has passed without a worker (deadline: unix seconds, DeadlineExceeded past it)."""
        while self._policy == "refuse" and not self.is_live(model):
            waited = self._clock() - self._last_live.get(model, self._clock())
            left = min(self._grace - waited, deadline - time.time())
            if waited >= self._grace:
                raise NoLiveWorker(model, waited)
            if left <= 0:
                raise DeadlineExceeded("deadline passed while waiting for a worker to serve the model")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                continue
