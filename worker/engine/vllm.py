"""GPU engine on vLLM's AsyncLLM (vLLM 0.26 to 0.33). The only module that imports vLLM.

vLLM does the continuous batching, stop sequences (stop=...), seeded sampling, and JSON
mode (structured outputs with xgrammar); outputs arrive in DELTA mode, so each one
holds only the new tokens. An EngineDeadError becomes EngineDead: the worker fails
every running job with UNAVAILABLE and exits non-zero so Kubernetes restarts it.
"""

import logging
from collections.abc import AsyncIterator
from typing import Any

from vllm import AsyncEngineArgs, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError

from common.models import ModelSpec
from worker.config import VllmSettings
from worker.engine.base import Delta, Engine, EngineDead, EngineError, GenerationRequest

log = logging.getLogger(__name__)


class VllmEngine(Engine):
    def __init__(self, spec: ModelSpec, settings: VllmSettings, max_num_seqs: int) -> None:
        self.model_name = spec.name
        self._spec = spec
        self._settings = settings
        self._max_num_seqs = max_num_seqs
        self.context_window = settings.max_model_len
        self.fingerprint = "fp_vllm"
        self._engine: AsyncLLM | None = None
        self._active: set[str] = set()
        self._kv_cache_usage = 0.0

    async def start(self) -> None:
        import vllm

        s = self._settings
        args = AsyncEngineArgs(
            model=str(self._spec.path),
            tensor_parallel_size=s.tensor_parallel_size,
            gpu_memory_utilization=s.gpu_memory_utilization,
            max_num_seqs=self._max_num_seqs,
            dtype=s.dtype,
            load_format=s.load_format,
            enforce_eager=s.enforce_eager,
            **({"max_model_len": s.max_model_len} if s.max_model_len else {}),
        )
        self._engine = AsyncLLM.from_engine_args(args)
        self.context_window = int(self._engine.model_config.max_model_len)
        self.fingerprint = f"fp_vllm_{vllm.__version__}"
        log.info("vLLM %s ready: %s, context %d", vllm.__version__, self._spec.path, self.context_window)

    async def stop(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    @property
    def num_active(self) -> int:
        return len(self._active)

    async def abort(self, request_id: str) -> None:
        if self._engine is not None and request_id in self._active:
            await self._engine.abort(request_id)

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        return self._generate(request)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if self._engine is None:
            raise EngineDead("engine is not started")
        if request.request_id in self._active:
            raise EngineError(f"request {request.request_id} is already running")
        self._active.add(request.request_id)
        generated = 0
        try:
            prompt = TokensPrompt(prompt_token_ids=request.prompt_token_ids)
            outputs = self._engine.generate(prompt, _sampling_params(request), request.request_id)
            async for output in outputs:
                completion = output.outputs[0]
                generated += len(completion.token_ids)
                reason = completion.finish_reason
                if reason == "abort":
                    return  # aborted: the iterator ends without a finish reason
                finish = reason if reason in ("stop", "length") else None
                if completion.text or finish:
                    yield Delta(completion.text, generated, finish)
                if output.finished:
                    return
        except EngineDeadError as exc:
            raise EngineDead(str(exc)) from exc
        finally:
            self._active.discard(request.request_id)


def _sampling_params(request: GenerationRequest) -> SamplingParams:
    p = request.params
    extra: dict[str, Any] = {}
    if p.json_mode:
        extra["structured_outputs"] = StructuredOutputsParams(json_object=True)
    return SamplingParams(
        temperature=p.temperature,
        top_p=p.top_p,
        max_tokens=p.max_tokens,
        seed=p.seed,
        stop=list(p.stop) or None,
        output_kind=RequestOutputKind.DELTA,
        **extra,
    )
