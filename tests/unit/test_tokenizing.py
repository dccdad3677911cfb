"""Large prompts are tokenized off the event loop (gateway/tokenizing.py), with the real tokenizer."""

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import pytest

from chat.v1 import chat_pb2
from common.models import ModelSpec
from gateway.catalog import ModelCatalog
from gateway.errors import InvalidField
from gateway.tokenizing import PromptValidator
from gateway.validation import Limits

MODEL = "SmolLM2-135M-Instruct"
# Tokenizing one such prompt takes about 125 ms on one core: one stall of a stream in place.
MAX_PROMPT_CHARS = Limits().max_prompt_chars


@pytest.fixture(scope="module")
def catalog() -> ModelCatalog:
    return ModelCatalog.load((ModelSpec.parse(MODEL),))


def request(chars: int) -> chat_pb2.ChatCompletionRequest:
    rng = random.Random(0)
    text = " ".join(rng.choice(("hello", "world", "prompt", "flood")) for _ in range(chars // 4))
    r = chat_pb2.ChatCompletionRequest(model=MODEL, max_tokens=1)
    r.messages.add(role="user", content=text[:chars])
    return r


async def longest_stall(work: Callable[[], Awaitable[object]]) -> tuple[float, object]:
    """The longest the event loop went without running a ready callback while `work()` ran."""
    done = False
    stall = 0.0

    async def tick() -> None:
        nonlocal stall
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stall, last = max(stall, now - last), now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    result = await work()
    done = True
    await ticker
    return stall, result


async def test_maximum_size_prompts_leave_the_event_loop_free(catalog: ModelCatalog) -> None:
    validator = PromptValidator(catalog, 1024, Limits(), threads=1)
    prompts = [request(MAX_PROMPT_CHARS) for _ in range(3)]
    started = time.perf_counter()
    stall, results = await longest_stall(
        lambda: asyncio.gather(*(validator.validate(p) for p in prompts), return_exceptions=True)
    )
    elapsed = time.perf_counter() - started
    validator.close()
    # Each was tokenized: too long for the context window, which only tokenizing tells.
    assert all(isinstance(r, InvalidField) and r.field == "messages" for r in results), results  # type: ignore[attr-defined]
    assert stall < 0.05, (
        f"the loop stalled {stall * 1000:.0f} ms while {elapsed:.2f}s of prompts were tokenized"
    )


async def test_small_prompts_are_validated_in_place(catalog: ModelCatalog) -> None:
    validator = PromptValidator(catalog, 1024, Limits(), threads=1)
    validator.close()  # a thread hop would now fail: a small prompt needs none
    valid = await validator.validate(request(200))
    assert valid.model == MODEL and valid.prompt_token_ids
