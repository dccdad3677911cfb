"""Benchmark engine: emits tokens at a configured rate with no model behind it.

For measuring the plumbing (gateway, Redis, worker) alone and for fault tests that
need many fast, predictable generations. Never a default: select it explicitly with
WORKER_ENGINE=bench. Token i of a request is the word `t{i}` (with a space) and has id
i, so a reply is predictable and a resumed stream can be checked token by token; a
continued generation numbers on after the tokens it continues. It is certain of every
token: asked for log probabilities, each is 0 and the only likely token is the one generated;
asked for n choices, it generates the same reply n times.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator

from common.models import ModelSpec
from worker.engine.base import Delta, Engine, EngineError, GenerationRequest, TokenLogprob
from worker.engine.text import StopMatcher


class BenchEngine(Engine):
    def __init__(self, spec: ModelSpec, tokens_per_second: float, context_window: int = 8192) -> None:
        self.model_name = spec.name
        self.context_window = context_window
        self.fingerprint = "fp_benchmark"
        self._interval = 1.0 / tokens_per_second if tokens_per_second > 0 else 0.0
        self._aborted: dict[str, asyncio.Event] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        for aborted in self._aborted.values():
            aborted.set()

    @property
    def num_active(self) -> int:
        return len(self._aborted)

    async def abort(self, request_id: str) -> None:
        if (aborted := self._aborted.get(request_id)) is not None:
            aborted.set()

    def decode(self, token_ids: list[int]) -> str:
        return "".join(f"t{i} " for i in token_ids)

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        return self._generate(request)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if request.request_id in self._aborted:
            raise EngineError(f"request {request.request_id} is already running")
        aborted = self._aborted[request.request_id] = asyncio.Event()
        stop = StopMatcher(request.params.stop)
        max_tokens = request.params.max_tokens
        first = request.num_generated + 1  # token ids go on where the continued generation stopped
        pending: list[int] = []  # ids whose text the stop matcher still holds back
        top_logprobs = request.params.logprobs
        try:
            for count, i in enumerate(range(first, first + max_tokens), start=1):
                if self._interval:
                    # Waiting on the abort event both paces the tokens and ends the wait on abort.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(aborted.wait(), self._interval)
                else:
                    await asyncio.sleep(0)
                if aborted.is_set():
                    return
                text = stop.feed(f"t{i} ")
                pending.append(i)
                ids, finish = tuple(pending), "stop" if stop.matched else None
                if finish is None and count == max_tokens:
                    text, finish = text + stop.flush(), "length"
                if text or finish:
                    pending.clear()
                    logprobs = () if top_logprobs is None else tuple(_certain(i, top_logprobs) for i in ids)
                    for index in range(request.params.n):
                        yield Delta(text, count, finish, ids, logprobs, index)
                if finish:
                    return
        finally:
            del self._aborted[request.request_id]


def _certain(token_id: int, top_logprobs: int) -> TokenLogprob:
    token = TokenLogprob(f"t{token_id} ", 0.0)
    return TokenLogprob(token.token, 0.0, (token,) if top_logprobs else ())
