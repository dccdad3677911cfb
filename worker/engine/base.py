"""The engine interface every inference backend implements.

An engine runs many generations at once. `generate()` starts one and returns an
async iterator of deltas; the last delta carries `finish_reason`. Stop sequences
are handled inside the engine: no delta ever contains text of a matched stop
sequence. `abort()` ends a generation early; its iterator then stops without a
finish_reason.
"""

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None
    stop: tuple[str, ...] = ()
    json_mode: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class Delta:
    text: str
    completion_tokens: int  # tokens generated so far
    finish_reason: str | None = None  # "stop" or "length" on the last delta


class EngineError(RuntimeError):
    """The engine failed a generation (a bug, or the engine itself died)."""


class EngineDead(EngineError):
    """The engine can no longer serve anything; the process should exit and be restarted."""


class Engine(ABC):
    model_name: str
    context_window: int
    # Identifies engine + model build; reported to callers as system_fingerprint.
    fingerprint: str

    @abstractmethod
    async def start(self) -> None:
        """Load the model and be ready to generate."""

    @abstractmethod
    async def stop(self) -> None:
        """Abort what runs and release resources."""

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Start a generation; iterate to receive its deltas."""

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """End a generation early. Unknown or finished ids are ignored."""

    @property
    @abstractmethod
    def num_active(self) -> int:
        """Generations started and not yet ended (for leak checks and metrics)."""

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV cache in use, 0-1, where the engine can tell."""
        return 0.0
