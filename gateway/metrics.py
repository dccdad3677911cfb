"""Every gateway metric, defined once. Labels: model, rpc, code, reason, transport; never a request id.

Each gateway process serves its own metrics on GATEWAY_METRICS_PORT; run one process
per pod (or give each its own port) so counters are never shared between processes.
"""

import time

from prometheus_client import Counter, Gauge, Histogram

from common.tracing import CallSpan
from gateway.tiers import ON_DEMAND

# Buckets suited to LLM serving: first tokens take 10 ms .. a minute, tokens 1 ms .. seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

TRANSPORTS = ("grpc", "http")
REQUESTS = Counter(
    "chat_gateway_requests_total",
    "Calls answered, by final gRPC status code (HTTP calls too: errors.STATUSES maps them)",
    ["model", "rpc", "code", "transport"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "chat_gateway_time_to_first_token_seconds",
    "From accepting a call to relaying its first generated text, by the tier that served it",
    ["model", "service_tier"],
    buckets=TTFT_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "chat_gateway_inter_token_latency_seconds",
    "Gap between consecutive relayed deltas of one stream (a delta holds one token unless the caller lags)",
    ["model"],
    buckets=ITL_BUCKETS,
)
REQUEST_DURATION = Histogram(
    "chat_gateway_request_duration_seconds",
    "End-to-end duration of completed calls",
    ["model", "rpc", "transport"],
    buckets=DURATION_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "chat_gateway_queue_wait_seconds",
    "Time a job waited in Redis before a worker took it, by the tier (lane) it waited in",
    ["model", "service_tier"],
    buckets=QUEUE_BUCKETS,
)
OPEN_CALLS = Gauge("chat_gateway_open_calls", "Calls (unary and streams) in progress on this gateway")
QUEUE_DEPTH = Gauge(
    "chat_gateway_queue_depth", "Jobs waiting in Redis for a worker, sampled every second", ["model"]
)
FLEX_QUEUE_DEPTH = Gauge(
    "chat_gateway_flex_queue_depth",
    "Flex jobs (service_tier flex) waiting in their lane for a worker, sampled every second;"
    " past GATEWAY_FLEX_MAX_QUEUED_JOBS flex calls are refused",
    ["model"],
)
PROMPT_TOKENS = Counter("chat_gateway_prompt_tokens_total", "Prompt tokens of completed calls", ["model"])
COMPLETION_TOKENS = Counter(
    "chat_gateway_completion_tokens_total", "Tokens generated for completed calls", ["model"]
)
REJECTIONS = Counter(
    "chat_gateway_rejections_total",
    "Calls refused before queueing, by reason (see REJECTION_REASONS)",
    ["model", "reason"],
)
RESUMED_STREAMS = Counter(
    "chat_gateway_resumed_streams_total",
    "Calls whose job another worker took over, by outcome: continued, restarted (nothing was shown"
    " yet) or aborted (text was streamed and the job could not continue)",
    ["model", "outcome"],
)
DETACHED_JOBS = Counter(
    "chat_gateway_detached_jobs_total",
    "Jobs whose caller left while they ran and that ran on for a resume, by how they ended:"
    " finished (to the end), cancelled (nobody came back within the grace) or failed",
    ["model", "outcome"],
)
UNREPLICATED_SUBMITS = Counter(
    "chat_gateway_unreplicated_submits_total",
    "Jobs queued that fewer than GATEWAY_SUBMIT_REPLICAS replicas had within GATEWAY_SUBMIT_WAIT_MS"
    " (a failover then may lose them; the lost-job check ends their calls UNAVAILABLE)",
)
REDIS_UP = Gauge("chat_gateway_redis_up", "1 while Redis answers this gateway, else 0")
PLACEMENTS = Counter(
    "chat_gateway_placements_total",
    "Jobs placed for the prefix cache (GATEWAY_CACHE_AFFINITY, with two or more workers), by outcome:"
    " preferred (on the worker that ran the longest matching prefix), spilled (that worker was over"
    " its share of the load or full: elsewhere), unmatched (no live worker known to hold the prefix:"
    " the one holding the fewest conversations, or any worker), moved (placed, not taken within"
    " GATEWAY_AFFINITY_DELAY_MS: moved to any worker)",
    ["model", "outcome"],
)
PLACEMENT_OUTCOMES = ("preferred", "spilled", "unmatched", "moved")


REJECTION_REASONS = (
    "invalid",
    "unauthenticated",
    "permission_denied",
    "rate_limited",
    "queue_full",
    "flex_capacity_exceeded",  # the flex lane is full (GATEWAY_FLEX_MAX_QUEUED_JOBS)
    "too_many_calls",
    "redis_unavailable",
    "no_worker",  # GATEWAY_NO_WORKER=refuse: no live worker serves the model
    "redis_full",
    "too_large",
    "idempotency_conflict",
)


def initialize(models: list[str]) -> None:
    """Creates every labelled series at zero, so dashboards and alerts see them before the first event."""
    for model in models:
        for reason in REJECTION_REASONS:
            REJECTIONS.labels(model, reason)
        for outcome in ("continued", "restarted", "aborted"):
            RESUMED_STREAMS.labels(model, outcome)
        for outcome in ("finished", "cancelled", "failed"):
            DETACHED_JOBS.labels(model, outcome)
        for outcome in PLACEMENT_OUTCOMES:
            PLACEMENTS.labels(model, outcome)
        PROMPT_TOKENS.labels(model)
        COMPLETION_TOKENS.labels(model)


def model_label(name: str, served: list[str]) -> str:
    """A request's model as a label: only served names, so callers cannot grow the label set."""
    return name if name in served else "other"


class CallRecorder:
    """Records the metrics of one call as its events pass through the gateway, and its span.

    A traced call puts its trace id on the TTFT and duration observations as an exemplar, so a
    dashboard can go from a slow bucket to a trace (exemplars show in the OpenMetrics format only).
    """

    def __init__(self, rpc: str, model: str, transport: str = "grpc", span: CallSpan | None = None) -> None:
        self.rpc = rpc
        self.model = model
        self.transport = transport
        self.span = span or CallSpan()
        self._exemplar = {"trace_id": self.span.trace_id} if self.span.trace_id else None
        self._start = time.monotonic()
        self._last_delta: float | None = None
        self.service_tier = ON_DEMAND  # set once the call's job is queued (gateway/relay.py)

    def delta(self) -> None:
        now = time.monotonic()
        if self._last_delta is None:
            TIME_TO_FIRST_TOKEN.labels(self.model, self.service_tier).observe(
                now - self._start, self._exemplar
            )
            self.span.first_token(now - self._start)
        else:
            INTER_TOKEN_LATENCY.labels(self.model).observe(now - self._last_delta)
        self._last_delta = now

    def finished(
        self, prompt_tokens: int, completion_tokens: int, queue_time: float, finish_reason: str = ""
    ) -> None:
        PROMPT_TOKENS.labels(self.model).inc(prompt_tokens)
        COMPLETION_TOKENS.labels(self.model).inc(completion_tokens)
        QUEUE_WAIT.labels(self.model, self.service_tier).observe(queue_time)
        duration = time.monotonic() - self._start
        REQUEST_DURATION.labels(self.model, self.rpc, self.transport).observe(duration, self._exemplar)
        self.span.finished(finish_reason, prompt_tokens, completion_tokens, queue_time)

    def done(self, code: str) -> None:
        REQUESTS.labels(self.model, self.rpc, code, self.transport).inc()
        self.span.end(code)
