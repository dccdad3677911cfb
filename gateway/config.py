"""Gateway settings: the only place the gateway reads environment variables.

| variable | default | meaning |
|---|---|---|
| GATEWAY_ADDRESS | [::]:50051 | address the gRPC server listens on |
| GATEWAY_HTTP_ADDRESS | :8080 | address of the Groq/OpenAI-compatible HTTP API (`HOST:PORT`; no host = all) |
| GATEWAY_MODEL_ALIASES | | comma-separated `ALIAS=MODEL`: requests naming ALIAS run on the served MODEL |
| REDIS_URL | redis://localhost:6379/0 | the job queue's Redis, or `redis+sentinel://` (docs/operating.md) |
| GATEWAY_MODELS | SmolLM2-135M-Instruct | comma-separated `NAME=DIR` models; `NAME` alone: bundled model |
| GATEWAY_DEFAULT_MAX_TOKENS | 1024 | max_tokens when a request sets none (capped: context, key's tpm) |
| GATEWAY_DEFAULT_TIMEOUT_SECONDS | 300 | deadline when the caller sets none; also the longest honoured |
| GATEWAY_ID | host-pid-random | names this process's reply stream in Redis |
| GATEWAY_MAX_QUEUED_JOBS | 1000 | jobs waiting per model beyond which calls get RESOURCE_EXHAUSTED |
| GATEWAY_FLEX_MAX_QUEUED_JOBS | 100 | flex jobs waiting per model beyond which flex calls get HTTP 498 |
| GATEWAY_MAX_CONCURRENT_CALLS | 2000 | open calls beyond which new ones get RESOURCE_EXHAUSTED |
| GATEWAY_RETRY_AFTER_SECONDS | 1 | retry delay suggested (google.rpc.RetryInfo) when overloaded |
| GATEWAY_SHUTDOWN_GRACE_SECONDS | 25 | on SIGTERM, time open calls get to finish |
| GATEWAY_MAX_REQUEST_BYTES | 1048576 | largest request message accepted (bigger: RESOURCE_EXHAUSTED) |
| GATEWAY_MAX_MESSAGES | 256 | most messages in one request |
| GATEWAY_MAX_PROMPT_CHARS | 200000 | most characters of message content in a request (before tokenizing) |
| GATEWAY_MAX_STOP_CHARS | 256 | most characters in one stop sequence |
| GATEWAY_MAX_NAME_CHARS | 64 | most characters in a message's name |
| GATEWAY_MAX_USER_CHARS | 256 | most characters in the user field |
| GATEWAY_MAX_CHOICES | 8 | largest `n` (choices per request) |
| GATEWAY_MAX_STREAMS_PER_CONNECTION | 1024 | concurrent calls one HTTP/2 connection may open |
| GATEWAY_NO_WORKER | refuse | model with no live worker: `refuse` (UNAVAILABLE/503) or `queue` (scale to 0) |
| GATEWAY_NO_WORKER_GRACE_SECONDS | 10 | `refuse`: how long a model may lack a live worker before refusals |
| GATEWAY_AUTH | off | `on`: callers need an API key (`authorization: Bearer ...`), see gateway/auth.py |
| GATEWAY_AUTH_CACHE_SECONDS | 5 | how long a looked-up key is trusted before Redis is asked again |
| GATEWAY_REFLECTION | on, off with auth | gRPC server reflection; with GATEWAY_AUTH=on it needs a key |
| GATEWAY_TOKENIZER_THREADS | 1 | threads that tokenize large prompts off the event loop |
| GATEWAY_IDEMPOTENCY_WINDOW_SECONDS | 600 | a retry with the same Idempotency-Key attaches to the first job |
| GATEWAY_RESUME_WINDOW_SECONDS | 600 | a completion stays resumable and readable so long after its end |
| GATEWAY_SSE_KEEPALIVE_SECONDS | 15 | an HTTP stream silent so long gets a `: keepalive` SSE comment |
| GATEWAY_LOST_JOB_CHECK_SECONDS | 2 | how often waiting calls' jobs are looked for in Redis (lost: 503) |
| GATEWAY_SUBMIT_REPLICAS | 0 | after queueing a job, WAIT until this many replicas have it (0: no wait) |
| GATEWAY_SUBMIT_WAIT_MS | 50 | the longest that WAIT takes; a job not replicated by then is queued anyway |
| GATEWAY_GRPC_KEEPALIVE_SECONDS | 60 | the gRPC server pings connections idle this long (HTTP/2 PING) |
| GATEWAY_RESUME_GRACE_SECONDS | 10 | a dropped stream's job runs on so long for a resume, then is cancelled |
| GATEWAY_TLS_CERT_FILE | | server certificate chain (PEM); with the key file, the port serves TLS |
| GATEWAY_TLS_KEY_FILE | | server private key (PEM) |
| GATEWAY_TLS_CLIENT_CA_FILE | | CA bundle (PEM); when set, clients need a certificate it signed (mTLS) |
| REDIS_TLS_CA_FILE | | CA bundle to verify Redis (and sentinels) with, for rediss:// (+sentinel) URLs |
| GATEWAY_METRICS_PORT | 9100 | HTTP port of this process's Prometheus /metrics (0 = any free port) |
| GATEWAY_REDIS_TIMEOUT_SECONDS | 2 | connect/command timeout towards Redis; then a call fails UNAVAILABLE |
| OTEL_EXPORTER_OTLP_ENDPOINT | | traces to OTLP (common/tracing.py; other OTEL_* too); unset = off |
"""

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from common.models import ModelSpec, parse_model_specs
from common.redis_client import check_url
from common.settings import env_float, env_int, env_str, job_streams
from gateway.presence import POLICIES


@dataclass(frozen=True)
class GatewaySettings:
    address: str
    redis_url: str
    models: tuple[ModelSpec, ...]
    http_address: str
    model_aliases: tuple[tuple[str, str], ...]  # (alias, served model name)
    default_max_tokens: int
    default_timeout_seconds: float
    gateway_id: str
    max_queued_jobs: int
    flex_max_queued_jobs: int
    max_concurrent_calls: int
    retry_after_seconds: float
    shutdown_grace_seconds: float
    redis_timeout_seconds: float
    metrics_port: int
    max_request_bytes: int
    max_messages: int
    max_prompt_chars: int
    max_stop_chars: int
    max_name_chars: int
    max_user_chars: int
    max_choices: int
    max_streams_per_connection: int
    auth: bool
    auth_cache_seconds: float
    reflection: bool
    idempotency_window_seconds: float
    tls_cert_file: str
    tls_key_file: str
    tls_client_ca_file: str
    redis_tls_ca_file: str
    tokenizer_threads: int = 1
    no_worker_policy: str = "refuse"  # gateway/presence.py
    no_worker_grace_seconds: float = 10.0
    resume_window_seconds: float = 600.0  # gateway/completion_log.py
    resume_grace_seconds: float = 10.0
    sse_keepalive_seconds: float = 15.0
    grpc_keepalive_seconds: float = 60.0
    submit_replicas: int = 0
    submit_wait_ms: int = 50
    lost_job_check_seconds: float = 2.0
    job_streams: int = 1  # REDIS_JOB_STREAMS (common/settings.py)
    cache_affinity: bool = True  # gateway/placement.py
    affinity_epsilon: float = 0.5
    affinity_delay_ms: int = 50

    def __post_init__(self) -> None:
        served = {m.name for m in self.models}
        for alias, target in self.model_aliases:
            if target not in served:
                raise ValueError(f"GATEWAY_MODEL_ALIASES maps {alias!r} to {target!r}, which is not served")
            if alias in served:
                raise ValueError(f"GATEWAY_MODEL_ALIASES: {alias!r} is already a served model's name")
        self.http_host_port  # noqa: B018 - refuses a malformed address at start-up
        if self.submit_replicas and self.submit_wait_ms > self.redis_timeout_seconds * 500:
            # WAIT's reply is read under the command timeout: a longer wait would fail the submit.
            raise ValueError(
                "GATEWAY_SUBMIT_WAIT_MS must be at most half of GATEWAY_REDIS_TIMEOUT_SECONDS,"
                f" got {self.submit_wait_ms} ms against {self.redis_timeout_seconds} s"
            )
        if self.no_worker_policy not in POLICIES:
            raise ValueError(f"GATEWAY_NO_WORKER must be one of {POLICIES}, got {self.no_worker_policy!r}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("GATEWAY_TLS_CERT_FILE and GATEWAY_TLS_KEY_FILE must be set together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError(
                "GATEWAY_TLS_CLIENT_CA_FILE (mTLS) needs GATEWAY_TLS_CERT_FILE and GATEWAY_TLS_KEY_FILE"
            )

    @property
    def http_host_port(self) -> tuple[str | None, int]:
        """GATEWAY_HTTP_ADDRESS as (host, port); host None listens on every interface."""
        host, sep, port = self.http_address.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"GATEWAY_HTTP_ADDRESS must be HOST:PORT or :PORT, got {self.http_address!r}")
        host = host.strip("[]")
        return (host if host and host not in ("0.0.0.0", "::") else None), int(port)

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self.model_aliases)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "GatewaySettings":
        env = os.environ if env is None else env
        auth = _on_off(env, "GATEWAY_AUTH")
        return cls(
            address=env_str(env, "GATEWAY_ADDRESS", "[::]:50051"),
            redis_url=check_url(env_str(env, "REDIS_URL", "redis://localhost:6379/0")),
            models=parse_model_specs(env_str(env, "GATEWAY_MODELS", "SmolLM2-135M-Instruct")),
            http_address=env_str(env, "GATEWAY_HTTP_ADDRESS", ":8080"),
            model_aliases=_aliases(env_str(env, "GATEWAY_MODEL_ALIASES", "")),
            default_max_tokens=env_int(env, "GATEWAY_DEFAULT_MAX_TOKENS", 1024, minimum=1),
            default_timeout_seconds=env_float(env, "GATEWAY_DEFAULT_TIMEOUT_SECONDS", 300.0, minimum=1.0),
            gateway_id=env_str(
                env, "GATEWAY_ID", f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            ),
            max_queued_jobs=env_int(env, "GATEWAY_MAX_QUEUED_JOBS", 1000, minimum=1),
            flex_max_queued_jobs=env_int(env, "GATEWAY_FLEX_MAX_QUEUED_JOBS", 100, minimum=0),
            max_concurrent_calls=env_int(env, "GATEWAY_MAX_CONCURRENT_CALLS", 2000, minimum=1),
            retry_after_seconds=env_float(env, "GATEWAY_RETRY_AFTER_SECONDS", 1.0, minimum=0.0),
            shutdown_grace_seconds=env_float(env, "GATEWAY_SHUTDOWN_GRACE_SECONDS", 25.0, minimum=0.0),
            redis_timeout_seconds=env_float(env, "GATEWAY_REDIS_TIMEOUT_SECONDS", 2.0, minimum=0.1),
            metrics_port=env_int(env, "GATEWAY_METRICS_PORT", 9100, minimum=0),
            max_request_bytes=env_int(env, "GATEWAY_MAX_REQUEST_BYTES", 1 << 20, minimum=1024),
            max_messages=env_int(env, "GATEWAY_MAX_MESSAGES", 256, minimum=1),
            max_prompt_chars=env_int(env, "GATEWAY_MAX_PROMPT_CHARS", 200_000, minimum=1),
            max_stop_chars=env_int(env, "GATEWAY_MAX_STOP_CHARS", 256, minimum=1),
            max_name_chars=env_int(env, "GATEWAY_MAX_NAME_CHARS", 64, minimum=1),
            max_user_chars=env_int(env, "GATEWAY_MAX_USER_CHARS", 256, minimum=0),
            max_choices=env_int(env, "GATEWAY_MAX_CHOICES", 8, minimum=1),
            max_streams_per_connection=env_int(env, "GATEWAY_MAX_STREAMS_PER_CONNECTION", 1024, minimum=1),
            auth=auth,
            auth_cache_seconds=env_float(env, "GATEWAY_AUTH_CACHE_SECONDS", 5.0, minimum=0.0),
            # Reflection lists every service and message: with auth on, only when asked for.
            reflection=_on_off(env, "GATEWAY_REFLECTION", "off" if auth else "on"),
            idempotency_window_seconds=env_float(
                env, "GATEWAY_IDEMPOTENCY_WINDOW_SECONDS", 600.0, minimum=1.0
            ),
            tls_cert_file=env_str(env, "GATEWAY_TLS_CERT_FILE", ""),
            tls_key_file=env_str(env, "GATEWAY_TLS_KEY_FILE", ""),
            tls_client_ca_file=env_str(env, "GATEWAY_TLS_CLIENT_CA_FILE", ""),
            redis_tls_ca_file=env_str(env, "REDIS_TLS_CA_FILE", ""),
            tokenizer_threads=env_int(env, "GATEWAY_TOKENIZER_THREADS", 1, minimum=1),
            no_worker_policy=env_str(env, "GATEWAY_NO_WORKER", "refuse").lower(),
            # At least two health ticks: the gateway learns of live workers on its first one.
            no_worker_grace_seconds=env_float(env, "GATEWAY_NO_WORKER_GRACE_SECONDS", 10.0, minimum=2.0),
            resume_window_seconds=env_float(env, "GATEWAY_RESUME_WINDOW_SECONDS", 600.0, minimum=1.0),
            resume_grace_seconds=env_float(env, "GATEWAY_RESUME_GRACE_SECONDS", 10.0, minimum=0.0),
            sse_keepalive_seconds=env_float(env, "GATEWAY_SSE_KEEPALIVE_SECONDS", 15.0, minimum=0.1),
            grpc_keepalive_seconds=env_float(env, "GATEWAY_GRPC_KEEPALIVE_SECONDS", 60.0, minimum=10.0),
            submit_replicas=env_int(env, "GATEWAY_SUBMIT_REPLICAS", 0, minimum=0),
            submit_wait_ms=env_int(env, "GATEWAY_SUBMIT_WAIT_MS", 50, minimum=1),
            lost_job_check_seconds=env_float(env, "GATEWAY_LOST_JOB_CHECK_SECONDS", 2.0, minimum=0.1),
            job_streams=job_streams(env),
            cache_affinity=_on_off(env, "GATEWAY_CACHE_AFFINITY", "on"),
            affinity_epsilon=env_float(env, "GATEWAY_AFFINITY_EPSILON", 0.5, minimum=0.0),
            affinity_delay_ms=env_int(env, "GATEWAY_AFFINITY_DELAY_MS", 50, minimum=1),
        )


def _on_off(env: Mapping[str, str], name: str, default: str = "off") -> bool:
    value = env_str(env, name, default).lower()
    if value not in ("on", "off"):
        raise ValueError(f"{name} must be on or off, got {value!r}")
    return value == "on"


def _aliases(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        alias, sep, target = (x.strip() for x in part.partition("="))
        if not sep or not alias or not target:
            raise ValueError(f"GATEWAY_MODEL_ALIASES entries must be ALIAS=MODEL, got {part!r}")
        pairs.append((alias, target))
    if len({alias for alias, _ in pairs}) != len(pairs):
        raise ValueError("GATEWAY_MODEL_ALIASES names an alias twice")
    return tuple(pairs)
