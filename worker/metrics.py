"""Every worker metric, defined once. Labels: model, outcome, reason; never a request id.

Each worker process serves its own metrics on WORKER_METRICS_PORT.
"""

from prometheus_client import Counter, Gauge, Histogram

RUNNING = Gauge("chat_worker_running_requests", "Generations active in the engine", ["model"])
WAITING = Gauge(
    "chat_worker_waiting_requests", "Jobs taken from Redis that wait for the engine to start them", ["model"]
)
FREE_SLOTS = Gauge(
    "chat_worker_free_slots", "Jobs this worker can still take (max concurrency - taken)", ["model"]
)
KV_CACHE_USAGE = Gauge(
    "chat_worker_kv_cache_usage_ratio", "Fraction of the engine's KV cache in use (0-1)", ["model"]
)
JOBS = Counter(
    "chat_worker_jobs_total",
    "Jobs ended, by outcome: finished, or the failure kind (cancelled, deadline_exceeded, ...)",
    ["model", "outcome"],
)
GENERATED_TOKENS = Counter("chat_worker_generated_tokens_total", "Tokens generated", ["model"])
RECLAIMED = Counter(
    "chat_worker_reclaimed_jobs_total", "Jobs taken over from unresponsive workers", ["model"]
)
DEAD_LETTERS = Counter("chat_worker_dead_letters_total", "Jobs moved to the dead-letter stream", ["model"])
ABORTS = Counter(
    "chat_worker_aborts_total",
    "Generations aborted early, by reason: cancelled, gateway_gone, deadline, reclaimed, drain",
    ["model", "reason"],
)
HANDED_BACK = Counter(
    "chat_worker_handed_back_total", "Unfinished jobs handed to other workers on drain", ["model"]
)
ABORT_REASONS = ("cancelled", "gateway_gone", "reclaimed", "drain")


def initialize(model: str) -> None:
    """Creates every labelled series at zero, so dashboards and alerts see them before the first event."""
    for counter in (GENERATED_TOKENS, RECLAIMED, DEAD_LETTERS, HANDED_BACK):
        counter.labels(model)
    for reason in ABORT_REASONS:
        ABORTS.labels(model, reason)
    JOBS.labels(model, "finished")


JOB_DURATION = Histogram(
    "chat_worker_job_duration_seconds",
    "Time from taking a job to its terminal event",
    ["model"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600),
)
