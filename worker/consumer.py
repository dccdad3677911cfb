"""The worker loop: claim jobs up to free capacity, run them, watch them, drain on SIGTERM.

take:      new jobs (XREADGROUP) and jobs of dead workers (XAUTOCLAIM), up to free slots
run:       one task per job (runner.run_job), exactly one terminal event each
watch:     abort jobs whose caller left (cancel flag) or whose gateway died (reply stream gone);
           stop serving when the engine has died
heartbeat: keep our pending entries fresh; drop jobs another worker has reclaimed; tell
           gateways the engine's context window (common/engine_registry.py)
drain:     on stop, finish what runs within the grace period, hand the rest back
"""

import asyncio
import contextlib
import logging
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from common import codec, engine_registry, keys, tracing
from common.supervise import being_cancelled, supervised
from worker import metrics
from worker.config import WorkerSettings
from worker.engine.base import Engine, EngineDead, sequences
from worker.jobs import Delivery, ModelJobs
from worker.publisher import EventPublisher
from worker.runner import FailureKind, JobEvents, can_continue, run_job, sampling_params

log = logging.getLogger(__name__)

_BACKOFF_SECONDS = (0.1, 0.2, 0.5, 1.0, 2.0)
_ENGINE_DEATH_GRACE_SECONDS = 2.0
_WITHDRAW_LOAD_SECONDS = 1.0


def _sequences(job: codec.Job | None) -> int:
    return 1 if job is None else sequences(sampling_params(job))


class _Running:
    def __init__(self, delivery: Delivery, events: JobEvents) -> None:
        self.delivery = delivery
        self.events = events
        self.task: asyncio.Task[None] | None = None
        self.handed_back = False  # True: leave it pending for another worker, publish nothing more
        self.aborted = False  # True: stop it, whether or not it has reached the engine yet
        # What it takes of WORKER_MAX_CONCURRENCY: the engine runs a sequence per choice (one
        # for greedy choices, which are all the same: worker/engine/base.py sequences).
        self.sequences = _sequences(delivery.job)


class JobConsumer:
    def __init__(
        self,
        settings: WorkerSettings,
        redis: Redis,
        engine: Engine,
        publisher: EventPublisher,
        tracer: tracing.Tracing = tracing.OFF,
    ) -> None:
        self._settings = settings
        self._tracer = tracer
        self._redis = redis
        self._engine = engine
        self._publisher = publisher
        self._model = settings.model.name
        self._jobs = ModelJobs(redis, self._model, settings.worker_id, settings.job_streams)
        self._running: dict[str, _Running] = {}  # by request_id
        self._widest_job = 1  # the most sequences a job taken here has had: reads take free // it
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._next_reclaim = 0.0
        self._next_forget = 0.0
        self.fatal_error: BaseException | None = None

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def free_sequences(self) -> int:
        """What is left of WORKER_MAX_CONCURRENCY: a job of n choices fills n of the engine's
        sequences. Reads take free // (the most sequences a job here has had) jobs at a time, at
        least one, so once a worker has seen jobs of n choices it overshoots by at most n - 1
        (vLLM queues those sequences itself); the first read of a burst of them, before any was
        seen, can overshoot by more. Never below 0."""
        return max(0, self._settings.max_concurrency - sum(r.sequences for r in self._running.values()))

    def jobs_to_read(self) -> int:
        """How many jobs the next read may take: at least one while a sequence is free, more only
        as many as surely fit, counting each as the widest job seen here."""
        free = self.free_sequences
        return max(1, free // self._widest_job) if free else 0

    def flex_jobs_to_read(self, jobs: int) -> int:
        """How many of a read of `jobs` jobs may be flex ones: as many as leave WORKER_FLEX_RESERVE
        sequences free, so that an on_demand job arriving next starts at once instead of waiting
        for a flex one to end (vLLM's priority policy preempts for KV cache, not for a batch slot)."""
        spare = self.free_sequences - self._settings.flex_reserve
        return min(jobs, max(1, spare // self._widest_job)) if spare > 0 else 0

    def stop(self) -> None:
        """Stop taking jobs (SIGTERM); run() returns, then drain() finishes or hands back the rest."""
        self._stopping.set()
        self._slot_freed.set()

    async def run(self) -> None:
        """Serves jobs until stop() is called or the engine dies."""
        helpers = [supervised("watch-running", self._watch_running), supervised("heartbeat", self._heartbeat)]
        failures = 0
        try:
            await self._jobs.ensure_groups()
            await self._advertise()
            while not self._stopping.is_set():
                free = self.jobs_to_read()
                if free <= 0:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                    continue
                try:
                    for delivery in await self._take(free):
                        self._accept(delivery)
                    failures = 0
                except RedisError as exc:
                    delay = _BACKOFF_SECONDS[min(failures, len(_BACKOFF_SECONDS) - 1)]
                    failures += 1
                    log.warning("job stream unavailable (%s); retrying in %.1fs", exc, delay)
                    if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                        with contextlib.suppress(RedisError):  # tried again at the next failure
                            await self._jobs.ensure_groups()  # Redis lost its data: start over
                    await asyncio.sleep(delay)
        finally:
            # Stopping: no load, so gateways place no more jobs here. Briefly: the drain comes first.
            with contextlib.suppress(RedisError, TimeoutError):
                await asyncio.wait_for(self._advertise(), _WITHDRAW_LOAD_SECONDS)
            if self.fatal_error is None:
                await self.drain()
            else:
                await self._fail_running()
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            try:
                await engine_registry.withdraw(self._redis, self._model, self._settings.worker_id)
            except RedisError as exc:
                log.warning("cannot withdraw from the engine registry (%s); the entry expires", exc)
        if self.fatal_error is not None:
            raise self.fatal_error

    async def drain(self) -> None:
        """Lets running jobs finish within the drain period, then hands the rest back."""
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if tasks:
            log.info("draining %d jobs (up to %.0fs)", len(tasks), self._settings.drain_seconds)
            await asyncio.wait(tasks, timeout=self._settings.drain_seconds)
        left = list(self._running.values())
        if not left:
            return
        log.warning("handing back %d unfinished jobs", len(left))
        for running in left:
            running.handed_back = True
            running.events.silenced = True
        try:
            await self._jobs.hand_back([r.delivery for r in left])
        except RedisError as exc:
            log.error("cannot hand back jobs (%s); they are reclaimed after the claim timeout", exc)
        metrics.HANDED_BACK.labels(self._model).inc(len(left))
        for running in left:
            await self._abort(running, "drain")
        await asyncio.gather(*(r.task for r in left if r.task is not None), return_exceptions=True)

    async def _fail_running(self) -> None:
        """The engine died: its running jobs end UNAVAILABLE through their generate() at once;
        wait briefly for them to say so, so callers hear it now rather than after a reclaim."""
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=_ENGINE_DEATH_GRACE_SECONDS)
        try:
            await self._publisher.flush()
        except RedisError as exc:
            log.error("cannot publish the failures of the dead engine's jobs: %s", exc)

    async def _take(self, free: int) -> list[Delivery]:
        # Orphans are looked for twice per heartbeat: a dead worker's jobs are taken over at most
        # half a heartbeat after they pass the claim timeout, which is what a caller waits for.
        period = self._settings.heartbeat_seconds / 2
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + period
            reclaimed = await self._jobs.reclaim(free, int(self._settings.claim_idle_seconds * 1000))
            if reclaimed:
                log.info("reclaimed %d jobs of unresponsive workers", len(reclaimed))
                metrics.RECLAIMED.labels(self._model).inc(len(reclaimed))
                return reclaimed
        flex = self.flex_jobs_to_read(free)
        taken = await self._jobs.read_new(free, block_ms=int(period * 1000), flex_jobs=flex)
        linger = self._settings.idle_linger_seconds
        if linger and len(taken) == 1 < free and not self._running:
            # The first job of a burst wakes the read alone; started now, the engine would prefill
            # it by itself and the rest of the burst would wait for that whole step.
            await asyncio.sleep(linger)
            flex -= sum(keys.is_flex_stream(d.stream) for d in taken)
            taken += await self._jobs.read_new(free - 1, block_ms=None, flex_jobs=max(0, flex))
        return taken

    def _accept(self, delivery: Delivery) -> None:
        deadline = delivery.job.deadline if delivery.job is not None else 0.0
        events = JobEvents(
            delivery.request_id, delivery.reply_to, delivery.attempt, self._publisher, deadline
        )
        running = _Running(delivery, events)
        if delivery.request_id in self._running:
            log.error(
                "job %s is already running here; ignoring entry %s", delivery.request_id, delivery.entry_id
            )
            return
        self._running[delivery.request_id] = running
        self._widest_job = max(self._widest_job, running.sequences)
        running.task = asyncio.create_task(self._run(running), name=f"job-{delivery.request_id}")

    async def _run(self, running: _Running) -> None:
        delivery, events = running.delivery, running.events
        job = delivery.job
        dead_letter_reason = ""
        taken = time.monotonic()
        span = self._trace(delivery)
        try:
            if job is None:
                dead_letter_reason = f"undecodable job: {delivery.error}"
                events.failed(FailureKind.FAILURE_KIND_BAD_PAYLOAD, "the job could not be decoded")
            elif delivery.attempt > self._settings.max_deliveries:
                dead_letter_reason = f"delivered {delivery.attempt} times; its workers keep dying"
                events.failed(FailureKind.FAILURE_KIND_INTERNAL, f"job abandoned: {dead_letter_reason}")
            elif job.deadline and job.deadline <= time.time():
                events.failed(FailureKind.FAILURE_KIND_DEADLINE_EXCEEDED, "deadline passed while queued")
            elif await self._redis.exists(keys.cancel_flag(self._jobs.of(delivery).stream, job.request_id)):
                events.failed(FailureKind.FAILURE_KIND_CANCELLED, "caller left while queued")
            else:
                if delivery.attempt > 1 and can_continue(job):
                    await self._continue_from_progress(delivery, events)
                    if events.continued_from is not None:
                        span.continued(len(events.continued_from.token_ids))
                # Checked after the awaits above: an abort that arrived meanwhile found nothing in
                # the engine to stop, so the job must not get there (silenced jobs publish nothing).
                if running.aborted:
                    events.failed(FailureKind.FAILURE_KIND_CANCELLED, "aborted before it started")
                else:
                    await run_job(job, self._engine, events, self._settings.worker_id, span.carrier())
        except EngineDead as exc:
            self._engine_died(exc)
        except Exception:
            log.exception("job %s: unexpected error", delivery.request_id)
            if not events.terminal_sent:
                events.failed(FailureKind.FAILURE_KIND_INTERNAL, "worker error")
        finally:
            self._running.pop(delivery.request_id, None)
            self._slot_freed.set()
            metrics.JOBS.labels(self._model, events.outcome or "handed_back").inc()
            metrics.GENERATED_TOKENS.labels(self._model).inc(events.tokens_generated_here)
            metrics.JOB_DURATION.labels(self._model).observe(time.monotonic() - taken)
            span.end(events.outcome or "handed_back", events.tokens_generated_here)
        if running.handed_back:
            return
        try:
            await events.wait_written()  # its terminal event is in Redis before the job ends
            if dead_letter_reason:
                ended = await self._jobs.of(delivery).dead_letter(delivery, dead_letter_reason)
                metrics.DEAD_LETTERS.labels(self._model).inc(ended)
            else:
                ended = await self._jobs.of(delivery).acknowledge(delivery)
            if not ended:
                # We stalled past the claim timeout and another worker runs the job now (our
                # events were fenced off): its entry and progress record are that attempt's.
                log.warning(
                    "job %s was taken over by another worker; leaving it to that one", delivery.request_id
                )
        except RedisError as exc:
            # Left pending: after the claim timeout another worker runs it again.
            log.error("job %s: cannot report its end (%s)", delivery.request_id, exc)

    def _trace(self, delivery: Delivery) -> tracing.AttemptSpan:
        """This attempt's span, under the call's span the job carries (another attempt: another span)."""
        job = delivery.job
        context = job.trace_context if job is not None else {}
        return self._tracer.attempt(
            context, delivery.request_id, self._model, delivery.attempt, self._settings.worker_id
        )

    async def _continue_from_progress(self, delivery: Delivery, events: JobEvents) -> None:
        """Takes over what earlier attempts published, so this one continues instead of starting over."""
        try:
            progress = await self._jobs.of(delivery).take_over_progress(delivery.request_id, delivery.attempt)
        except codec.BadPayload as exc:
            log.error("job %s: progress record unreadable (%s); starting over", delivery.request_id, exc)
            return
        if progress is None:
            log.info(
                "job %s: nothing was published; attempt %d starts over", delivery.request_id, delivery.attempt
            )
            return
        log.info(
            "job %s: attempt %d continues after %d tokens (seq %d)",
            delivery.request_id,
            delivery.attempt,
            len(progress.token_ids),
            progress.last_seq,
        )
        events.continue_from(progress)

    async def _watch_running(self) -> None:
        """Aborts jobs whose caller has gone (cancel flag) or whose gateway died (reply stream gone)."""
        while True:
            if being_cancelled():  # as in _heartbeat: a cancel turned into a Redis error handled below
                raise asyncio.CancelledError
            await asyncio.sleep(self._settings.cancel_poll_seconds)
            if self._engine.is_dead and self.fatal_error is None:
                # Jobs running now fail through their generate(); an idle worker must not take more.
                self._engine_died(EngineDead("the engine process died"))
            running = list(self._running.values())
            if not running:
                continue
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for r in running:
                        pipe.exists(keys.cancel_flag(self._jobs.of(r.delivery).stream, r.delivery.request_id))
                        pipe.exists(r.delivery.reply_to)
                    replies = await pipe.execute()
            except RedisError as exc:
                log.warning("cannot check running jobs: %s", exc)
                continue
            for r, cancelled, gateway_alive in zip(running, replies[::2], replies[1::2], strict=True):
                if cancelled or not gateway_alive:
                    await self._abort(r, "cancelled" if cancelled else "gateway_gone")

    def _engine_died(self, error: EngineDead) -> None:
        log.critical("engine died: %s", error)
        self.fatal_error = error
        self.stop()

    async def _advertise(self) -> None:
        # Valid for the claim timeout: a worker silent that long is considered dead anyway. A
        # worker that is stopping advertises no load: gateways place no more jobs on it.
        load = None
        if not self._stopping.is_set():
            capacity = self._settings.max_concurrency
            load = engine_registry.WorkerLoad(
                stream=self._jobs.own.stream,
                block_size=self._engine.block_size,
                running=capacity - self.free_sequences,
                capacity=capacity,
            )
        await engine_registry.advertise(
            self._redis,
            self._model,
            self._settings.worker_id,
            self._engine.context_window,
            ttl=self._settings.claim_idle_seconds,
            job_streams=self._settings.job_streams,
            load=load,
        )

    async def _housekeeping(self) -> None:
        """Besides the heartbeat, and never in its way: advertise the engine, keep our own stream
        listed, learn which workers live, forget dead ones."""
        try:
            await self._advertise()
            await self._jobs.ensure_own(unless_listed=True)
            live = await engine_registry.live_engines(self._redis, self._model)
            self._jobs.live_workers = live.worker_ids if live is not None else frozenset()
            now = time.monotonic()
            if now >= self._next_forget:
                self._next_forget = now + self._settings.claim_idle_seconds
                await self._jobs.forget_dead_consumers(int(self._settings.claim_idle_seconds * 1000))
        except RedisError as exc:
            if being_cancelled():  # stopping: redis-py turned the cancel into this error
                raise
            log.warning("engine advertisement or consumer clean-up failed: %s", exc)

    async def _abort(self, running: _Running, reason: str) -> None:
        log.info("aborting job %s: %s", running.delivery.request_id, reason)
        metrics.ABORTS.labels(self._model, reason).inc()
        running.aborted = True  # a job not yet in the engine must not start
        await self._engine.abort(running.delivery.request_id)

    async def _heartbeat(self) -> None:
        """Keeps our jobs from being reclaimed; stops jobs another worker has taken over meanwhile."""
        while True:
            if being_cancelled():
                # A cancel that redis-py turned into an error which a step here handled (the
                # clean-up suppresses Redis errors): stop all the same, or stop() waits for ever.
                raise asyncio.CancelledError
            await asyncio.sleep(self._settings.heartbeat_seconds)
            running = [r for r in self._running.values() if not r.handed_back]
            try:
                owned = await self._jobs.heartbeat([r.delivery for r in running])
            except RedisError as exc:
                if being_cancelled():  # stopping: redis-py turned the cancel into this error
                    raise
                log.warning("heartbeat failed: %s", exc)
                continue
            await self._housekeeping()
            for r in running:
                if self._jobs.key(r.delivery) not in owned and r.delivery.request_id in self._running:
                    log.warning(
                        "job %s was reclaimed by another worker; stopping our copy", r.delivery.request_id
                    )
                    r.handed_back = True
                    r.events.silenced = True
                    await self._abort(r, "reclaimed")
