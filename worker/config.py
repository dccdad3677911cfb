"""Worker settings: the only place the worker reads environment variables.

| variable | default | meaning |
|---|---|---|
| REDIS_URL | redis://localhost:6379/0 | the job queue's Redis, or `redis+sentinel://` (docs/operating.md) |
| WORKER_MODEL | SmolLM2-135M-Instruct | `NAME=DIR` of the model to serve; `NAME` alone is the bundled model |
| WORKER_ENGINE | vllm | inference engine: `vllm`, or `bench` (no model: tokens at a set rate) |
| WORKER_ID | host-pid-random | consumer name in the job stream's consumer group |
| WORKER_MAX_CONCURRENCY | 8 | sequences run at once, one per choice of a job (vLLM's max_num_seqs) |
| WORKER_FLEX_RESERVE | 1 | sequences flex jobs leave free for on_demand ones (capped: concurrency - 1) |
| WORKER_CANCEL_POLL_SECONDS | 0.1 | how often running jobs are checked for cancellation |
| WORKER_HEARTBEAT_SECONDS | 0.5 | how often the worker marks its jobs alive (seeks orphans twice as often) |
| WORKER_CLAIM_IDLE_SECONDS | 2 | a job whose worker has not heartbeated for this long is taken over |
| WORKER_MAX_DELIVERIES | 3 | a job delivered more often than this (its workers keep dying) is dead-lettered |
| WORKER_DRAIN_SECONDS | 20 | on SIGTERM, time running jobs get to finish before they are handed back |
| WORKER_IDLE_LINGER_MS | 3 | an idle worker that takes one job waits this long for the rest of a burst |
| REDIS_TLS_CA_FILE | | CA bundle to verify Redis (and sentinels) with, for rediss:// (+sentinel) URLs |
| WORKER_METRICS_PORT | 9101 | HTTP port of this process's Prometheus /metrics (0 = any free port) |
| WORKER_VLLM_TENSOR_PARALLEL_SIZE | 1 | vLLM engine: GPUs per worker |
| WORKER_VLLM_GPU_MEMORY_UTILIZATION | 0.9 | vLLM engine: fraction of GPU memory for weights + KV cache |
| WORKER_VLLM_KV_CACHE_GIB | 0 | vLLM engine: KV cache size; 0 = 2 GiB on CPU, the rest of GPU memory |
| WORKER_VLLM_MAX_MODEL_LEN | 0 | vLLM engine: context length; 0 = the model's (gateways learn it) |
| WORKER_VLLM_DTYPE | auto | vLLM engine: compute dtype; auto: bf16 where the CPU has it natively, else f32 |
| WORKER_VLLM_LOAD_FORMAT | auto | vLLM engine: `dummy` gives random weights (benchmarks, no download) |
| WORKER_VLLM_ENFORCE_EAGER | auto | vLLM engine: 1 = no graph capture; auto = eager on CPU only |
| WORKER_VLLM_IGNORE_EOS | 0 | vLLM engine, benchmarks only: 1 = generate to max_tokens past end-of-sequence |
| WORKER_BENCH_TOKENS_PER_SECOND | 50 | benchmark engine only: tokens per second per request (0 = flat out) |
| OTEL_EXPORTER_OTLP_ENDPOINT | | traces to OTLP, vLLM's too (common/tracing.py); unset = off |
"""

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from common.models import ModelSpec
from common.redis_client import check_url
from common.settings import env_float, env_int, env_str, job_streams

ENGINES = ("vllm", "bench")


@dataclass(frozen=True)
class VllmSettings:
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    kv_cache_gib: float = 0.0  # 0: the engine's default for the platform
    max_model_len: int = 0  # 0: the model's own
    dtype: str = "auto"
    load_format: str = "auto"  # "dummy": random weights, for benchmarks
    enforce_eager: bool | None = None  # None: eager on CPU, graphs on GPU
    ignore_eos: bool = False  # benchmarks only: every reply runs to max_tokens (as vLLM's ignore_eos)


@dataclass(frozen=True)
class WorkerSettings:
    redis_url: str
    model: ModelSpec
    engine: str
    worker_id: str
    max_concurrency: int
    cancel_poll_seconds: float
    heartbeat_seconds: float
    claim_idle_seconds: float
    max_deliveries: int
    drain_seconds: float
    idle_linger_seconds: float
    bench_tokens_per_second: float
    metrics_port: int
    redis_tls_ca_file: str
    vllm: VllmSettings
    job_streams: int = 1  # REDIS_JOB_STREAMS (common/settings.py)
    flex_reserve: int = 0  # WORKER_FLEX_RESERVE

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "WorkerSettings":
        env = os.environ if env is None else env
        engine = env_str(env, "WORKER_ENGINE", "vllm")
        if engine not in ENGINES:
            raise ValueError(f"WORKER_ENGINE must be one of {ENGINES}, got {engine!r}")
        max_concurrency = env_int(env, "WORKER_MAX_CONCURRENCY", 8, minimum=1)
        # Short, so a caller waits little when a worker dies (takeover continues the reply, so a
        # false takeover of a worker that was only slow costs a prefill, not the reply).
        heartbeat = env_float(env, "WORKER_HEARTBEAT_SECONDS", 0.5, minimum=0.1)
        claim_idle = env_float(env, "WORKER_CLAIM_IDLE_SECONDS", 2.0, minimum=0.1)
        if claim_idle < 2 * heartbeat:
            raise ValueError("WORKER_CLAIM_IDLE_SECONDS must be at least twice WORKER_HEARTBEAT_SECONDS")
        return cls(
            redis_url=check_url(env_str(env, "REDIS_URL", "redis://localhost:6379/0")),
            model=ModelSpec.parse(env_str(env, "WORKER_MODEL", "SmolLM2-135M-Instruct")),
            engine=engine,
            worker_id=env_str(env, "WORKER_ID", _default_worker_id()),
            max_concurrency=max_concurrency,
            # Capped, so that a worker of one sequence still serves flex work.
            flex_reserve=min(env_int(env, "WORKER_FLEX_RESERVE", 1, minimum=0), max_concurrency - 1),
            cancel_poll_seconds=env_float(env, "WORKER_CANCEL_POLL_SECONDS", 0.1, minimum=0.01),
            heartbeat_seconds=heartbeat,
            claim_idle_seconds=claim_idle,
            max_deliveries=env_int(env, "WORKER_MAX_DELIVERIES", 3, minimum=1),
            drain_seconds=env_float(env, "WORKER_DRAIN_SECONDS", 20.0, minimum=0.0),
            idle_linger_seconds=env_float(env, "WORKER_IDLE_LINGER_MS", 3.0, minimum=0.0) / 1000,
            bench_tokens_per_second=env_float(env, "WORKER_BENCH_TOKENS_PER_SECOND", 50.0, minimum=0.0),
            metrics_port=env_int(env, "WORKER_METRICS_PORT", 9101, minimum=0),
            redis_tls_ca_file=env_str(env, "REDIS_TLS_CA_FILE", ""),
            vllm=VllmSettings(
                tensor_parallel_size=env_int(env, "WORKER_VLLM_TENSOR_PARALLEL_SIZE", 1, minimum=1),
                gpu_memory_utilization=env_float(
                    env, "WORKER_VLLM_GPU_MEMORY_UTILIZATION", 0.9, minimum=0.05
                ),
                kv_cache_gib=env_float(env, "WORKER_VLLM_KV_CACHE_GIB", 0.0, minimum=0.0),
                max_model_len=env_int(env, "WORKER_VLLM_MAX_MODEL_LEN", 0, minimum=0),
                dtype=env_str(env, "WORKER_VLLM_DTYPE", "auto"),
                load_format=env_str(env, "WORKER_VLLM_LOAD_FORMAT", "auto"),
                enforce_eager=_auto_flag(env, "WORKER_VLLM_ENFORCE_EAGER"),
                ignore_eos=_flag(env, "WORKER_VLLM_IGNORE_EOS"),
            ),
            job_streams=job_streams(env),
        )


def _auto_flag(env: Mapping[str, str], name: str) -> bool | None:
    """`auto` (the default) -> None: the engine decides; `1`/`0` -> True/False."""
    flags = {"auto": None, "1": True, "0": False}
    text = env_str(env, name, "auto")
    if text not in flags:
        raise ValueError(f"{name} must be auto, 1 or 0, got {text!r}")
    return flags[text]


def _flag(env: Mapping[str, str], name: str) -> bool:
    """`0` (the default) or `1`."""
    text = env_str(env, name, "0")
    if text not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {text!r}")
    return text == "1"


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
