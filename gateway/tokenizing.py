"""Validation of large prompts off the event loop, so that a flood of them stalls no stream.

Validating a request tokenizes its prompt (gateway/validation.py): about 0.6 µs a character,
so 125 ms for a prompt of GATEWAY_MAX_PROMPT_CHARS (200,000), all of it on the event loop
that relays every other caller's tokens. Small prompts are validated in place (a thread hop
would cost more than they do); large ones in a pool of GATEWAY_TOKENIZER_THREADS threads of
their own. The tokenizer (Rust) releases the GIL, so the loop runs on meanwhile, and the
pool's size bounds the CPU that large prompts can take from relaying.
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor

from chat.v1 import chat_pb2
from common.models import Message
from gateway.catalog import ModelCatalog
from gateway.tools import tools_chars
from gateway.validation import Limits, ValidRequest, validate

# About 2.5 ms of tokenizing: below it, validating in place is cheaper than a thread hop.
INLINE_PROMPT_CHARS = 4096


class PromptValidator:
    def __init__(
        self, catalog: ModelCatalog, default_max_tokens: int, limits: Limits, threads: int = 1
    ) -> None:
        self._catalog = catalog
        self._default_max_tokens = default_max_tokens
        self._limits = limits
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="tokenize")
        # A tokenizer sets its options on first use: that happens here, not in two threads at once.
        for model in catalog:
            model.render([Message("user", "hello")])

    async def validate(self, request: chat_pb2.ChatCompletionRequest) -> ValidRequest:
        """validate() of gateway/validation.py, in a tokenizer thread when the prompt is large."""
        chars = sum(len(m.content) for m in request.messages) + tools_chars(request)
        # Over the limit it is refused before tokenizing, which is cheap: in place as well.
        if chars <= INLINE_PROMPT_CHARS or chars > self._limits.max_prompt_chars:
            return validate(request, self._catalog, self._default_max_tokens, self._limits)
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, validate, request, self._catalog, self._default_max_tokens, self._limits
        )

    def close(self) -> None:
        """Stops the tokenizer threads (idle ones would otherwise wait for the interpreter's exit)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
