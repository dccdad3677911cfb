"""Helpers for reading typed settings from environment variables.

Each process has one settings dataclass (gateway/config.py, worker/config.py) that
is the only reader of the environment; these helpers keep their errors uniform.
"""

from collections.abc import Mapping


def env_str(env: Mapping[str, str], name: str, default: str) -> str:
    return env.get(name, "").strip() or default


def env_int(env: Mapping[str, str], name: str, default: int, minimum: int | None = None) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def env_float(env: Mapping[str, str], name: str, default: float, minimum: float | None = None) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


MAX_JOB_STREAMS = 64


def job_streams(env: Mapping[str, str]) -> int:
    """REDIS_JOB_STREAMS: how many job streams each model's jobs spread over (common/keys.py).

    Read by gateways (which queue each job on one of them) and workers (which read them all), so
    the two must agree: both take it from the one ConfigMap in deploy/. More than one puts a hot
    model's queue on several Redis Cluster shards; on a single Redis it buys nothing."""
    value = env_int(env, "REDIS_JOB_STREAMS", 1, minimum=1)
    if value > MAX_JOB_STREAMS:
        raise ValueError(f"REDIS_JOB_STREAMS must be at most {MAX_JOB_STREAMS}, got {value}")
    return value
