"""CPU engine: Hugging Face transformers + torch with continuous batching.

transformers' ContinuousBatchingManager runs one background thread that steps all
active requests together (each step reads the weights once for the whole batch,
which is what makes 8 concurrent requests ~3x faster than one at a time on CPU).
Its outputs arrive on our event loop through per-request result handlers; this
module turns them into text deltas, cuts stop sequences and finishes or aborts
requests. Sampling happens in sampler.BatchSampler.
"""

import asyncio
import hashlib
import importlib.metadata
import itertools
import logging
import math
import os
from collections.abc import AsyncIterator
from typing import Any, cast

import torch
import xgrammar as xgr
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessorList
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager
from transformers.generation.continuous_batching.requests import RequestStatus

from common.models import ModelSpec, read_context_window
from worker.config import CpuEngineSettings
from worker.engine.base import Delta, Engine, EngineDead, EngineError, GenerationRequest
from worker.engine.sampler import SLOT_KWARG, BatchSampler, RequestSampler
from worker.engine.text import Decoder, IncrementalDetokenizer, StopMatcher

log = logging.getLogger(__name__)

_ABORTED = object()  # queued to a request's outputs by abort()
_PAGE_SIZE = 128


class CpuEngine(Engine):
    def __init__(self, spec: ModelSpec, settings: CpuEngineSettings) -> None:
        self.model_name = spec.name
        self._spec = spec
        self._settings = settings
        self.context_window = read_context_window(spec.path)
        self.fingerprint = _fingerprint(spec)
        self._sampler = BatchSampler()
        self._slots = itertools.count()
        self._outputs: dict[str, asyncio.Queue[Any]] = {}
        self._manager: ContinuousBatchingManager | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        # One tiny generation so the first real request does not pay for lazy initialisation.
        warmup = GenerationRequest("warmup", self._tokenizer.encode("Hi"))
        async for _ in self.generate(warmup):
            pass

    def _load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if self._settings.num_threads > 0:
            torch.set_num_threads(self._settings.num_threads)
        path = str(self._spec.path)
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=torch.float32, attn_implementation="sdpa"
        )
        self._eos_ids = _eos_ids(model.generation_config, self._tokenizer)
        self._vocab_size = model.config.vocab_size
        info = xgr.TokenizerInfo.from_huggingface(
            self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=sorted(self._eos_ids)
        )
        # response_format json_object: any JSON object (the builtin JSON grammar also allows arrays).
        self._json_grammar = xgr.GrammarCompiler(info).compile_json_schema('{"type": "object"}')
        # Room for at least one request that fills the whole context window.
        cache_tokens = max(self._settings.kv_cache_tokens, self.context_window + _PAGE_SIZE)
        config = ContinuousBatchingConfig(
            num_blocks=math.ceil(cache_tokens / _PAGE_SIZE),
            page_size=_PAGE_SIZE,
            max_batch_tokens=self._settings.max_batch_tokens,
            max_requests_per_batch=self._settings.max_batch_size,
            use_cuda_graph=False,
            use_async_batching=False,
        )
        generation_config = GenerationConfig(do_sample=False, eos_token_id=sorted(self._eos_ids))
        manager = ContinuousBatchingManager(cast(Any, model), generation_config, config)
        # Replace the manager's processors by our sampler before its batch processor is built:
        # one int32 argument row per processor (the sampler slot of each request).
        processors = ContinuousBatchingLogitsProcessorList(LogitsProcessorList([self._sampler]))
        processors.tensors_required = 1
        manager.logit_processor = processors
        manager.start()
        self._manager = manager

    async def stop(self) -> None:
        for request_id in list(self._outputs):
            await self.abort(request_id)
        if self._manager is not None:
            manager, self._manager = self._manager, None
            await asyncio.to_thread(manager.stop, True, 10.0)

    @property
    def num_active(self) -> int:
        return len(self._outputs)

    @property
    def kv_cache_usage(self) -> float:
        # Sectors of the paged cache in use (internal attributes; transformers is pinned).
        try:
            pool = self._manager.batch_processor.cache.pool  # type: ignore[union-attr]
            return 1.0 - pool.num_free_sectors / pool.num_sectors
        except (AttributeError, ZeroDivisionError):
            return 0.0

    async def abort(self, request_id: str) -> None:
        outputs = self._outputs.get(request_id)
        if outputs is not None:
            outputs.put_nowait(_ABORTED)

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        return self._generate(request)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        manager = self._running_manager()
        request_id, params = request.request_id, request.params
        if request_id in self._outputs:
            raise EngineError(f"request {request_id} is already running")
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        slot = next(self._slots)
        grammar = self._json_grammar if params.json_mode else None
        self._sampler.samplers[slot] = RequestSampler(params, self._vocab_size, grammar)
        self._outputs[request_id] = outputs
        manager.register_result_handler(request_id, outputs.put_nowait)
        finished = False
        sampler_kwargs: dict[str, Any] = {SLOT_KWARG: slot}
        try:
            manager.add_request(
                request.prompt_token_ids,
                request_id=request_id,
                max_new_tokens=params.max_tokens,
                streaming=True,
                eos_token_id=sorted(self._eos_ids),
                **sampler_kwargs,
            )
            detokenizer = IncrementalDetokenizer(cast(Decoder, self._tokenizer))
            stop = StopMatcher(params.stop)
            num_seen = 0
            while not finished:
                output = await outputs.get()
                if output is _ABORTED:
                    return
                if output.status == RequestStatus.FAILED:
                    finished = True  # the manager has already dropped it
                    raise EngineError(f"generation failed: {output.error}")
                tokens = output.generated_tokens
                finished = output.is_finished()
                text = stop.feed(detokenizer.add(tokens[num_seen:], final=finished))
                num_seen = len(tokens)
                if stop.matched:
                    yield Delta(text, num_seen, "stop")
                    return
                if finished:
                    reason = "stop" if tokens and tokens[-1] in self._eos_ids else "length"
                    yield Delta(text + stop.flush(), num_seen, reason)
                elif text:
                    yield Delta(text, num_seen)
        finally:
            if not finished:
                manager.cancel_request(request_id)
            self._release(request_id, slot)

    def _running_manager(self) -> ContinuousBatchingManager:
        manager = self._manager
        if manager is None:
            raise EngineDead("engine is not started")
        if not manager.is_running():
            raise EngineDead(f"generation thread died: {manager.background_thread_status.fatal_error}")
        return manager

    def _release(self, request_id: str, slot: int) -> None:
        self._outputs.pop(request_id, None)
        self._sampler.samplers.pop(slot, None)
        if self._manager is not None:
            # A cancelled request never delivers a final output, so its handler is not removed
            # by the manager itself (internal attribute; transformers is pinned).
            router = self._manager.output_router
            with router._lock:
                router.result_handlers.pop(request_id, None)


def _eos_ids(generation_config: GenerationConfig, tokenizer: Any) -> set[int]:
    ids = generation_config.eos_token_id
    eos = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return eos


def _fingerprint(spec: ModelSpec) -> str:
    digest = hashlib.sha256()
    digest.update(f"cpu-transformers-{importlib.metadata.version('transformers')}".encode())
    digest.update((spec.path / "config.json").read_bytes())
    for weights in sorted(spec.path.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return "fp_" + digest.hexdigest()[:10]
