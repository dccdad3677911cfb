"""Engines under test: the CPU engine always; vLLM when CUDA, vLLM and a model are present.

CONFORMANCE_VLLM_MODEL=/path/to/model [WORKER_VLLM_LOAD_FORMAT=dummy] pytest tests/conformance
"""

import importlib.util
import os
from collections.abc import AsyncIterator

import pytest

from common.model_store import DEFAULT_MODEL_NAME
from common.models import ModelSpec, PromptRenderer
from worker.config import CpuEngineSettings, WorkerSettings
from worker.engine.base import Engine


def _vllm_skip_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install .[gpu])"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    if not os.environ.get("CONFORMANCE_VLLM_MODEL"):
        return "CONFORMANCE_VLLM_MODEL names no model directory"
    return None


@pytest.fixture(
    scope="module",
    params=["cpu", pytest.param("vllm", marks=pytest.mark.gpu)],
)
async def engine_and_renderer(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Engine, PromptRenderer]]:
    engine: Engine
    if request.param == "cpu":
        from worker.engine.cpu import CpuEngine

        spec = ModelSpec.parse(DEFAULT_MODEL_NAME)
        engine = CpuEngine(spec, CpuEngineSettings(max_batch_size=8))
    else:
        if (reason := _vllm_skip_reason()) is not None:
            pytest.skip(reason)
        from worker.engine.vllm import VllmEngine

        spec = ModelSpec("conformance", __import__("pathlib").Path(os.environ["CONFORMANCE_VLLM_MODEL"]))
        settings = WorkerSettings.from_env({**os.environ, "WORKER_MODEL": f"conformance={spec.path}"})
        engine = VllmEngine(spec, settings.vllm, max_num_seqs=64)
    await engine.start()
    yield engine, PromptRenderer(spec)
    await engine.stop()


@pytest.fixture
def real_weights() -> bool:
    """Dummy weights (benchmarks) generate noise: checks that need a sensible reply are skipped."""
    return os.environ.get("WORKER_VLLM_LOAD_FORMAT", "auto") != "dummy"
