"""Any valid sampling parameters, edges included, are safe for the engine and for its batch.

A request with `temperature: 1e-300` once made the old CPU engine's sampler produce NaNs
and killed the worker with every request beside it. Here hypothesis draws requests from
the whole valid range of every parameter the gateway accepts (validation.py) and runs
each beside a greedy canary request: the drawn request must end normally, the canary
must be untouched, and nothing may stay active in the engine.
"""

import asyncio

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from common.models import Message
from tests.conformance.conftest import Pair
from tests.conformance.test_engine_conformance import run
from worker.engine.base import SamplingParams

_UINT64_MAX = 2**64 - 1
_SPECIAL_TEXT = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "\x00", "\ufffd", "🦙", "\u202e", "\n\n"]

temperatures = st.one_of(
    st.sampled_from([0.0, 5e-324, 1e-300, 1e-30, 1e-8, 1e-5, 2.0]),
    st.floats(min_value=0.0, max_value=2.0, allow_nan=False),
)
top_ps = st.one_of(
    st.sampled_from([5e-324, 1e-300, 1e-8, 1.0]),
    st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_nan=False),
)
penalties = st.one_of(st.sampled_from([-2.0, 0.0, 2.0]), st.floats(min_value=-2.0, max_value=2.0))
seeds = st.one_of(
    st.none(), st.sampled_from([0, 1, 2**63 - 1, 2**63, _UINT64_MAX]), st.integers(0, _UINT64_MAX)
)
stop_strings = st.one_of(st.sampled_from(_SPECIAL_TEXT), st.text(min_size=1, max_size=12))


@st.composite
def sampling_params(draw: st.DrawFn) -> SamplingParams:
    json_mode = draw(st.booleans())
    return SamplingParams(
        temperature=draw(temperatures),
        top_p=draw(top_ps),
        max_tokens=draw(st.integers(1, 8)),
        seed=draw(seeds),
        # The gateway refuses stop sequences together with JSON mode.
        stop=() if json_mode else tuple(draw(st.lists(stop_strings, max_size=4))),
        json_mode=json_mode,
        frequency_penalty=draw(penalties),
        presence_penalty=draw(penalties),
    )


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@example(SamplingParams(temperature=1e-300, max_tokens=8))
@example(SamplingParams(temperature=2.0, top_p=5e-324, max_tokens=8, seed=_UINT64_MAX))
@example(SamplingParams(temperature=1.0, max_tokens=8, stop=("<|im_end|>", "\x00", "🦙", "\u202e")))
@example(SamplingParams(temperature=0, max_tokens=8, frequency_penalty=-2.0, presence_penalty=-2.0))
@example(SamplingParams(temperature=2.0, max_tokens=8, frequency_penalty=2.0, presence_penalty=2.0))
@given(params=sampling_params())
async def test_any_valid_parameters_end_normally_and_leave_the_batch_alone(
    engine_and_renderer: Pair, params: SamplingParams
) -> None:
    engine, renderer = engine_and_renderer
    ids = renderer.render([Message("user", "Write a haiku about <|im_start|> tokens.")])
    canary_ids = renderer.render([Message("user", "Count to five.")])
    canary = SamplingParams(temperature=0, max_tokens=8)
    (_, drawn), (canary_text, canary_deltas) = await asyncio.gather(
        run(engine, ids, params), run(engine, canary_ids, canary)
    )
    assert drawn[-1].finish_reason in ("stop", "length")
    assert drawn[-1].completion_tokens <= params.max_tokens
    assert canary_deltas[-1].finish_reason in ("stop", "length") and canary_text
    assert engine.num_active == 0
