"""The engine's sampling parameters become vLLM's (worker/engine/vllm.py sampling_params)."""

from vllm import SamplingParams as VllmParams

from worker.engine.base import GenerationRequest, SamplingParams
from worker.engine.vllm import sampling_params


def vllm_params(params: SamplingParams, num_generated: int = 0) -> VllmParams:
    return sampling_params(GenerationRequest("r", [1, 2, 3, 4], params, num_generated=num_generated))


def test_penalties_reach_vllm() -> None:
    params = vllm_params(SamplingParams(frequency_penalty=1.25, presence_penalty=-2.0))
    assert (params.frequency_penalty, params.presence_penalty) == (1.25, -2.0)


def test_a_continuation_passes_the_same_penalties() -> None:
    # vLLM counts output tokens only: the continued tokens, now in the prompt, do not count.
    params = vllm_params(SamplingParams(frequency_penalty=2.0, presence_penalty=2.0), num_generated=2)
    assert (params.frequency_penalty, params.presence_penalty) == (2.0, 2.0)


def test_no_penalty_by_default() -> None:
    params = vllm_params(SamplingParams())
    assert (params.frequency_penalty, params.presence_penalty) == (0.0, 0.0)
