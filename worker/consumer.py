"""The worker loop: take as many jobs as there are free slots, run them, watch for cancels.

Jobs come from the model's job stream through the consumer group, so each job goes
to exactly one worker and stays in the group's pending list until it is acknowledged.
A job is acknowledged (and deleted) only after its terminal event is in Redis.
"""

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from common import codec, keys, streams
from worker.config import WorkerSettings
from worker.engine.base import Engine, EngineDead
from worker.publisher import EventPublisher
from worker.runner import FailureKind, JobEvents, run_job

log = logging.getLogger(__name__)


class JobConsumer:
    def __init__(
        self, settings: WorkerSettings, redis: Redis, engine: Engine, publisher: EventPublisher
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._engine = engine
        self._publisher = publisher
        self._stream = keys.job_stream(settings.model.name)
        self._running: dict[str, asyncio.Task[None]] = {}  # request_id -> job task
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self.fatal_error: BaseException | None = None

    @property
    def num_running(self) -> int:
        return len(self._running)

    async def run(self) -> None:
        """Serves jobs until stop() is called or the engine dies."""
        await self._ensure_group()
        watcher = asyncio.create_task(self._watch_cancellations(), name="cancel-watcher")
        try:
            while not self._stopping.is_set():
                free = self._settings.max_concurrency - len(self._running)
                if free <= 0:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                    continue
                await self._take_jobs(free)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        if self.fatal_error is not None:
            raise self.fatal_error

    def stop(self) -> None:
        self._stopping.set()
        self._slot_freed.set()

    async def wait_idle(self) -> None:
        while self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def _ensure_group(self) -> None:
        try:
            # Id 0: jobs queued before any worker existed are served too.
            await self._redis.xgroup_create(self._stream, keys.WORKER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _take_jobs(self, count: int) -> None:
        reply = await self._redis.xreadgroup(
            keys.WORKER_GROUP, self._settings.worker_id, {self._stream: ">"}, count=count, block=1000
        )
        for entry_id, fields in streams.entries(reply):
            self._accept(entry_id, fields)

    def _accept(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            job = codec.decode_job(fields.get(keys.PAYLOAD_FIELD, b""))
        except codec.BadPayload as exc:
            log.error("dropping malformed job %s: %s", entry_id, exc)
            self._spawn(self._acknowledge(entry_id))
            return
        if job.request_id in self._running:
            log.error("job %s is already running here; dropping duplicate entry %s", job.request_id, entry_id)
            self._spawn(self._acknowledge(entry_id))
            return
        task = asyncio.create_task(self._run_job(entry_id, job), name=f"job-{job.request_id}")
        self._running[job.request_id] = task

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _run_job(self, entry_id: bytes, job: codec.Job) -> None:
        events = JobEvents(job, self._publisher)
        try:
            if job.deadline and job.deadline <= time.time():
                events.failed(FailureKind.FAILURE_KIND_DEADLINE_EXCEEDED, "deadline passed while queued")
            elif await self._redis.exists(keys.cancel_flag(job.request_id)):
                events.failed(FailureKind.FAILURE_KIND_CANCELLED, "caller left while queued")
            else:
                await run_job(job, self._engine, events, self._settings.worker_id)
        except EngineDead as exc:
            log.critical("engine died: %s", exc)
            self.fatal_error = exc
            self.stop()
        except Exception:
            log.exception("job %s: unexpected error", job.request_id)
            if not events.terminal_sent:
                events.failed(FailureKind.FAILURE_KIND_INTERNAL, "worker error")
        finally:
            self._running.pop(job.request_id, None)
            self._slot_freed.set()
        await self._publisher.flush()
        await self._acknowledge(entry_id, job.request_id)

    async def _acknowledge(self, entry_id: bytes, request_id: str | None = None) -> None:
        """Removes a finished job from the stream (and its cancel flag, which has served its purpose)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self._stream, keys.WORKER_GROUP, entry_id)
            pipe.xdel(self._stream, entry_id)
            if request_id is not None:
                pipe.delete(keys.cancel_flag(request_id))
            await pipe.execute()

    async def _watch_cancellations(self) -> None:
        """Aborts running jobs whose caller has gone (the gateway sets their cancel flag)."""
        while True:
            await asyncio.sleep(self._settings.cancel_poll_seconds)
            request_ids = list(self._running)
            if not request_ids:
                continue
            try:
                flags = await self._redis.mget([keys.cancel_flag(r) for r in request_ids])
            except Exception as exc:
                log.warning("cannot check cancellations: %s", exc)
                continue
            for request_id, flag in zip(request_ids, flags, strict=True):
                if flag is not None:
                    log.info("job %s cancelled by its caller", request_id)
                    await self._engine.abort(request_id)
