"""Gateway settings: the only place the gateway reads environment variables.

| variable | default | meaning |
|---|---|---|
| GATEWAY_ADDRESS | [::]:50051 | address the gRPC server listens on |
| REDIS_URL | redis://localhost:6379/0 | Redis holding the job queue |
| GATEWAY_MODELS | SmolLM2-135M-Instruct | comma-separated `NAME=DIR` models; `NAME` alone: bundled model |
| GATEWAY_DEFAULT_MAX_TOKENS | 1024 | max_tokens when a request sets none (capped by the context window) |
| GATEWAY_DEFAULT_TIMEOUT_SECONDS | 300 | deadline when the caller sets none; also the longest honoured |
| GATEWAY_ID | host-pid-random | names this process's reply stream in Redis |
"""

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from common.models import ModelSpec, parse_model_specs
from common.settings import env_float, env_int, env_str


@dataclass(frozen=True)
class GatewaySettings:
    address: str
    redis_url: str
    models: tuple[ModelSpec, ...]
    default_max_tokens: int
    default_timeout_seconds: float
    gateway_id: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "GatewaySettings":
        env = os.environ if env is None else env
        return cls(
            address=env_str(env, "GATEWAY_ADDRESS", "[::]:50051"),
            redis_url=env_str(env, "REDIS_URL", "redis://localhost:6379/0"),
            models=parse_model_specs(env_str(env, "GATEWAY_MODELS", "SmolLM2-135M-Instruct")),
            default_max_tokens=env_int(env, "GATEWAY_DEFAULT_MAX_TOKENS", 1024, minimum=1),
            default_timeout_seconds=env_float(env, "GATEWAY_DEFAULT_TIMEOUT_SECONDS", 300.0, minimum=1.0),
            gateway_id=env_str(
                env, "GATEWAY_ID", f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            ),
        )
