"""Runs one job on the engine and turns it into exactly one stream of events.

Every job ends with exactly one terminal event, Finished or Failed, whatever
happens: engine error, abort, deadline, or a reply that JSON mode cannot accept.
No exception from the engine crosses Redis; it becomes a Failed event.
"""

import asyncio
import json
import logging
import time

from common import codec
from worker.engine.base import Delta, Engine, EngineDead, GenerationRequest, SamplingParams
from worker.publisher import EventPublisher

log = logging.getLogger(__name__)

FailureKind = codec.FailureKind


class JobEvents:
    """Numbers and publishes the events of one attempt at a job."""

    def __init__(self, request_id: str, reply_to: str, attempt: int, publisher: EventPublisher) -> None:
        self._request_id = request_id
        self._reply_to = reply_to
        self._attempt = attempt
        self._publisher = publisher
        self._seq = 0
        self.terminal_sent = False
        # Set when the job is handed to another worker: this attempt must say nothing more.
        self.silenced = False
        self.outcome = ""  # "finished" or the failure kind, once the terminal event is sent
        self.tokens = 0  # generated so far

    def _send(self, event: codec.Event) -> None:
        if self.silenced or not self._reply_to:
            return
        event.request_id = self._request_id
        event.seq = self._seq
        event.attempt = self._attempt
        self._seq += 1
        self._publisher.publish(self._reply_to, event)

    def started(self, worker_id: str, fingerprint: str) -> None:
        self._send(codec.Event(started=codec.Started(worker_id=worker_id, system_fingerprint=fingerprint)))

    def delta(self, text: str, completion_tokens: int) -> None:
        self.tokens = completion_tokens
        self._send(codec.Event(delta=codec.Delta(text=text, completion_tokens=completion_tokens)))

    def finished(self, finished: codec.Finished) -> None:
        self.terminal_sent = True
        self.outcome = "finished"
        self.tokens = finished.completion_tokens
        self._send(codec.Event(finished=finished))

    def failed(
        self, kind: codec.FailureKind, message: str, reason: str = "", failed_generation: str = ""
    ) -> None:
        self.terminal_sent = True
        self.outcome = codec.FailureKind.Name(kind).removeprefix("FAILURE_KIND_").lower()
        failed = codec.Failed(
            kind=kind,
            message=message,
            reason=reason,
            failed_generation=failed_generation,
        )
        self._send(codec.Event(failed=failed))


def sampling_params(job: codec.Job) -> SamplingParams:
    s = job.sampling
    return SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        max_tokens=s.max_tokens,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
        json_mode=s.json_mode,
    )


async def run_job(job: codec.Job, engine: Engine, events: JobEvents, worker_id: str) -> None:
    """Runs the job to its terminal event. Re-raises EngineDead after reporting it."""
    taken_at = time.time()
    events.started(worker_id, engine.fingerprint)
    request = GenerationRequest(job.request_id, list(job.prompt_token_ids), sampling_params(job))
    pieces: list[str] = []
    first_token_at: float | None = None
    last: Delta | None = None
    timeout = job.deadline - taken_at if job.deadline else None
    try:
        async with asyncio.timeout(timeout):
            async for last in engine.generate(request):
                first_token_at = first_token_at or time.time()
                if last.text:
                    pieces.append(last.text)
                    events.delta(last.text, last.completion_tokens)
    except TimeoutError:
        n = last.completion_tokens if last else 0
        events.failed(
            FailureKind.FAILURE_KIND_DEADLINE_EXCEEDED, f"deadline passed after {n} generated tokens"
        )
        return
    except EngineDead as exc:
        events.failed(FailureKind.FAILURE_KIND_UNAVAILABLE, f"engine unavailable: {exc}")
        raise
    except Exception as exc:
        log.exception("job %s failed", job.request_id)
        events.failed(FailureKind.FAILURE_KIND_INTERNAL, f"generation failed: {type(exc).__name__}: {exc}")
        return
    if last is None or last.finish_reason is None:
        events.failed(FailureKind.FAILURE_KIND_CANCELLED, "generation was aborted")
        return
    text = "".join(pieces)
    if job.sampling.json_mode and not _is_json_object(text):
        events.failed(
            FailureKind.FAILURE_KIND_INVALID_OUTPUT,
            "JSON mode: the generated output is not a valid JSON object"
            + (" (cut off by max_tokens)" if last.finish_reason == "length" else ""),
            reason="json_validate_failed",
            failed_generation=text,
        )
        return
    done_at = time.time()
    first_token_at = first_token_at or done_at
    events.finished(
        codec.Finished(
            finish_reason=last.finish_reason,
            prompt_tokens=len(job.prompt_token_ids),
            completion_tokens=last.completion_tokens,
            queue_time=max(0.0, taken_at - job.enqueued_at),
            prompt_time=first_token_at - taken_at,
            completion_time=done_at - first_token_at,
        )
    )


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
