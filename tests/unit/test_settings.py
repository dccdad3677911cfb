"""Settings are read from the environment once and refused with a clear message when wrong."""

import pytest

from common.models import ModelSpec, parse_model_specs
from gateway.config import GatewaySettings
from worker.config import WorkerSettings


def test_gateway_defaults() -> None:
    settings = GatewaySettings.from_env({})
    assert settings.address == "[::]:50051"
    assert [m.name for m in settings.models] == ["SmolLM2-135M-Instruct"]
    assert settings.default_timeout_seconds == 300


def test_worker_reads_its_variables() -> None:
    settings = WorkerSettings.from_env({"WORKER_MAX_CONCURRENCY": "4", "WORKER_CPU_THREADS": "2"})
    assert (
        settings.max_concurrency == 4 and settings.cpu.max_batch_size == 4 and settings.cpu.num_threads == 2
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORKER_MAX_CONCURRENCY": "lots"}, "WORKER_MAX_CONCURRENCY must be an integer"),
        ({"WORKER_MAX_CONCURRENCY": "0"}, "WORKER_MAX_CONCURRENCY must be at least 1"),
        ({"WORKER_ENGINE": "tpu"}, "WORKER_ENGINE must be one of"),
        ({"WORKER_MODEL": "other-model"}, "needs a directory"),
    ],
)
def test_bad_worker_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorkerSettings.from_env(env)


def test_model_specs() -> None:
    assert ModelSpec.parse("mine=/models/x").name == "mine"
    with pytest.raises(ValueError, match="unique"):
        parse_model_specs("a=/x,a=/y")
    with pytest.raises(ValueError, match="no model"):
        parse_model_specs(" , ")
