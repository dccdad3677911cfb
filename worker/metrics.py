"""Every worker metric, defined once. Labels: model, outcome, reason; never a request id.

Each worker process serves its own metrics on WORKER_METRICS_PORT. The engine's own view
(KV cache, its scheduler's running and waiting requests, prefix cache) is read from
Engine.stats at scrape time.
"""

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from worker.engine.base import Engine

RUNNING = Gauge(
    "chat_worker_running_requests", "Generations active in the engine (decoding or waiting)", ["model"]
)
WAITING = Gauge(
    "chat_worker_waiting_requests",
    "Generations the engine's scheduler holds back (batch full or no KV cache room)",
    ["model"],
)
FREE_SLOTS = Gauge(
    "chat_worker_free_slots",
    "Sequences this worker can still take (max concurrency - one per choice of the jobs taken)",
    ["model"],
)
KV_CACHE_USAGE = Gauge(
    "chat_worker_kv_cache_usage_ratio", "Fraction of the engine's KV cache in use (0-1)", ["model"]
)
DECODING = Gauge(
    "chat_worker_decoding_requests", "Generations the engine's scheduler decodes this step", ["model"]
)
PREFIX_CACHE_QUERIES = "chat_worker_prefix_cache_queries"  # _total: prompt tokens looked up
PREFIX_CACHE_HITS = "chat_worker_prefix_cache_hits"  # _total: prompt tokens found in the prefix cache
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


ENGINE = Info(
    "chat_worker_engine",
    "The engine this worker runs: its fingerprint (engine, version, device, dtype) and dtype",
    ["model"],
)


def observe_engine(model: str, engine: Engine) -> None:
    """Reads the engine's gauges and counters from Engine.stats whenever Prometheus scrapes."""
    ENGINE.labels(model).info({"fingerprint": engine.fingerprint, "dtype": engine.dtype or "none"})
    RUNNING.labels(model).set_function(lambda: engine.num_active)
    WAITING.labels(model).set_function(lambda: engine.stats.num_waiting)
    KV_CACHE_USAGE.labels(model).set_function(lambda: engine.stats.kv_cache_usage)
    DECODING.labels(model).set_function(lambda: engine.stats.num_running)
    REGISTRY.register(_PrefixCacheCollector(model, engine))


class _PrefixCacheCollector(Collector):
    def __init__(self, model: str, engine: Engine) -> None:
        self._model = model
        self._engine = engine

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self._engine.stats
        for name, value, what in (
            (PREFIX_CACHE_QUERIES, stats.prefix_cache_queries, "Prompt tokens looked up in the prefix cache"),
            (PREFIX_CACHE_HITS, stats.prefix_cache_hits, "Prompt tokens found in the prefix cache"),
        ):
            family = CounterMetricFamily(name, what, labels=["model"])
            family.add_metric([self._model], value)
            yield family


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
