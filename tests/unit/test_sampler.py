"""Per-request sampling of the CPU engine (worker/engine/sampler.py)."""

import torch

from worker.engine.base import SamplingParams
from worker.engine.sampler import BatchSampler, RequestSampler

VOCAB = 50


def logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed))


def draws(params: SamplingParams, n: int = 20) -> list[int]:
    sampler = RequestSampler(params, VOCAB, None)
    return [sampler.choose(logits(i)) for i in range(n)]


def test_greedy_takes_the_argmax() -> None:
    assert draws(SamplingParams(temperature=0)) == [int(logits(i).argmax()) for i in range(20)]


def test_the_same_seed_draws_the_same_tokens() -> None:
    params = SamplingParams(temperature=1.0, seed=123)
    assert draws(params) == draws(params)
    assert draws(params) != draws(SamplingParams(temperature=1.0, seed=124))


def test_top_p_keeps_only_the_nucleus() -> None:
    row = torch.full((VOCAB,), -10.0)
    row[7], row[9] = 5.0, 4.0  # ~73% and ~27% of the mass
    sampler = RequestSampler(SamplingParams(temperature=1.0, top_p=0.5, seed=1), VOCAB, None)
    assert {sampler.choose(row) for _ in range(50)} == {7}
    wide = RequestSampler(SamplingParams(temperature=1.0, top_p=0.99, seed=1), VOCAB, None)
    assert {wide.choose(row) for _ in range(200)} == {7, 9}


def test_batch_sampler_returns_one_finite_score_per_row() -> None:
    batch = BatchSampler()
    batch.samplers[3] = RequestSampler(SamplingParams(temperature=0), VOCAB, None)
    scores = torch.stack([logits(1), logits(2)])
    out = batch(scores, torch.tensor([3, -1], dtype=torch.int32))
    assert [int(r.argmax()) for r in out] == [int(logits(1).argmax()), int(logits(2).argmax())]
    assert int(torch.isfinite(out).sum()) == 2
