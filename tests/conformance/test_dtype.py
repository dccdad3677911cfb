"""The engine computes in the dtype the processor supports natively, and in either one on request.

`auto` must resolve to what worker/engine/dtype.py decides for this machine; the other of
bfloat16 / float32 is started explicitly (WORKER_VLLM_DTYPE) and must serve too: the model
store's weights (float32 on disk) and the KV cache (sized in bytes) work for both.
"""

import os

import pytest

from common.models import Message, ModelSpec
from tests.conformance.conftest import Pair
from worker.config import WorkerSettings
from worker.engine.base import GenerationRequest, SamplingParams
from worker.engine.dtype import choose_dtype, detect_cpu_features
from worker.engine.vllm import VllmEngine


async def generate_text(engine: VllmEngine, renderer_pair: Pair, request_id: str) -> tuple[str, int]:
    _, renderer = renderer_pair
    prompt = renderer.render([Message("user", "Name three colours.")])
    text, tokens = "", 0
    async for delta in engine.generate(
        GenerationRequest(request_id, prompt, SamplingParams(temperature=0, max_tokens=12))
    ):
        text += delta.text
        tokens = delta.completion_tokens
    return text, tokens


async def test_auto_runs_the_dtype_chosen_for_this_processor(engine_and_renderer: Pair) -> None:
    engine, _ = engine_and_renderer
    if os.environ.get("WORKER_VLLM_DTYPE", "auto") != "auto" or "_cpu_" not in engine.fingerprint:
        assert engine.dtype  # an explicit dtype or a GPU: whatever vLLM runs, it is reported
        return
    expected = choose_dtype("auto", "cpu", detect_cpu_features()).dtype
    print(f"\nauto on this CPU: {engine.dtype} ({engine.dtype_choice.reason})")
    assert engine.dtype == expected
    assert engine.fingerprint.endswith(f"_{expected}")


async def test_the_other_dtype_serves_when_asked_for(engine_and_renderer: Pair) -> None:
    engine, _ = engine_and_renderer
    if "_cpu_" not in engine.fingerprint:
        # The choice is the CPU's; on GPUs vLLM chooses, and attention kernels such as
        # FlashAttention 3 have no float32 to start the other engine with.
        pytest.skip("the dtype choice is made on CPUs only")
    other = "float32" if engine.dtype == "bfloat16" else "bfloat16"
    spec = ModelSpec("dtype-check", engine._spec.path)
    settings = WorkerSettings.from_env(
        {**os.environ, "WORKER_MODEL": f"{spec.name}={spec.path}", "WORKER_VLLM_DTYPE": other}
    )
    second = VllmEngine(spec, settings.vllm, max_num_seqs=2)
    await second.start()
    try:
        assert second.dtype == other and second.fingerprint.endswith(f"_{other}")
        text, tokens = await generate_text(second, engine_and_renderer, "dtype-other")
        reference, _ = await generate_text(engine, engine_and_renderer, "dtype-auto")
        print(f"\n{engine.dtype}: {reference!r}\n{other}: {text!r}")
        assert tokens > 0
    finally:
        await second.stop()
