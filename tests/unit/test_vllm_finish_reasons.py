"""Every way vLLM can end a request maps to an explicit outcome (worker/engine/vllm.py)."""

import pytest

from worker.engine.base import EngineError, EngineUnavailable
from worker.engine.vllm import finish_reason


@pytest.mark.parametrize("reason", [None, "stop", "length"])
def test_normal_endings_pass_through(reason: str | None) -> None:
    assert finish_reason(reason) == reason


@pytest.mark.parametrize(
    ("reason", "error", "message"),
    [
        ("abort", EngineUnavailable, "aborted"),  # an abort this engine did not ask for
        ("error", EngineUnavailable, "retryable"),
        ("repetition", EngineError, "repetitive"),
        ("something-new", EngineError, "unknown finish reason 'something-new'"),
    ],
)
def test_other_endings_raise_instead_of_ending_silently(
    reason: str, error: type[EngineError], message: str
) -> None:
    with pytest.raises(error, match=message):
        finish_reason(reason)


def test_every_finish_reason_vllm_defines_is_mapped() -> None:
    from vllm.v1.engine import FinishReason

    for reason in FinishReason:
        try:
            finish_reason(str(reason))
        except EngineError as exc:
            assert "unknown" not in str(exc), f"vLLM's {reason} is not mapped explicitly"
