"""Per-request sampling for the CPU engine, run inside transformers' continuous batching.

transformers' batching manager applies one list of logits processors to a batch of
rows, one row per request that gets a token this step. We give it a single processor,
`BatchSampler`, which picks each row's token itself: JSON grammar mask (xgrammar),
temperature, top_p, then a draw from the request's own seeded generator. It returns
scores where only the chosen token is finite, and the manager's greedy argmax takes it.

Sampling per request with its own torch.Generator is what makes `seed` reproducible:
the manager's own sampling shares one global RNG across the whole batch.
"""

import os
from collections.abc import Sequence

import torch
import xgrammar as xgr
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
)
from transformers.generation.continuous_batching.requests import FutureRequestState

from worker.engine.base import SamplingParams

# Name of the per-request argument the manager passes through to BatchSampler.
SLOT_KWARG = "sampler_slot"


class RequestSampler:
    """Chooses the tokens of one request."""

    def __init__(
        self, params: SamplingParams, vocab_size: int, json_grammar: xgr.CompiledGrammar | None
    ) -> None:
        self.temperature = params.temperature
        self.top_p = params.top_p
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator = torch.Generator().manual_seed(seed)
        self.matcher = xgr.GrammarMatcher(json_grammar) if json_grammar is not None else None
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size) if self.matcher is not None else None

    def choose(self, logits: torch.Tensor) -> int:
        """Picks the next token from one row of logits, shape [vocab]."""
        logits = logits.unsqueeze(0).clone()
        if self.matcher is not None and self._bitmask is not None:
            self.matcher.fill_next_token_bitmask(self._bitmask)
            xgr.apply_token_bitmask_inplace(logits, self._bitmask)
        greedy = self.temperature == 0
        token = int(logits.argmax()) if greedy else self._draw(logits[0] / self.temperature)
        if self.matcher is not None:
            self.matcher.accept_token(token)
        return token

    def _draw(self, logits: torch.Tensor) -> int:
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p
            sorted_probs[outside] = 0.0
            choice = torch.multinomial(sorted_probs, 1, generator=self.generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=self.generator))


class BatchSampler(ContinuousBatchingLogitsProcessor):
    """The one logits processor of the CPU engine's batching manager."""

    supported_kwargs: dict[str, type] = {SLOT_KWARG: int}  # noqa: RUF012 - the base class declares it so
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self) -> None:
        # slot -> sampler; written from the event loop, read from the generation thread.
        self.samplers: dict[int, RequestSampler] = {}

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(-1)

    def prepare_tensor_args(self, requests_with_new_token: Sequence[FutureRequestState]) -> torch.Tensor:
        slots = [r.state.logit_processor_kwargs.get(SLOT_KWARG, -1) for r in requests_with_new_token]
        return torch.tensor(slots, dtype=torch.int32)

    def __call__(self, scores: torch.FloatTensor, tensor_arg: torch.Tensor) -> torch.FloatTensor:
        chosen = torch.full_like(scores, float("-inf"))
        for row, slot in enumerate(tensor_arg[: scores.size(0)].tolist()):
            sampler = self.samplers.get(slot)
            token = sampler.choose(scores[row]) if sampler is not None else int(scores[row].argmax())
            chosen[row, token] = 0.0
        return chosen  # type: ignore[return-value]
