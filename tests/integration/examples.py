"""Running the reference's examples as the user would: each its own process, all at once."""

import asyncio
import os
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Every example but json_mode.py must succeed and print something.
PLAIN = ["basic.py", "streaming.py", "stop_sequence.py", "async_completion.py", "async_streaming.py"]
Outcome = tuple[int, str, str]  # exit code, stdout, stderr


async def run_examples(folder: Path, env: dict[str, str]) -> dict[str, Outcome]:
    """Runs every example in folder together (so the worker batches them), with env added."""
    names = sorted([*PLAIN, "json_mode.py"])
    assert set(names) <= set(os.listdir(folder)), f"{folder} lacks some of {names}"
    outcomes = await asyncio.gather(*(run_example(folder / name, env) for name in names))
    return dict(zip(names, outcomes, strict=True))


async def run_example(script: Path, env: dict[str, str]) -> Outcome:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("GROQ_", "OPENAI_"))}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        env={**inherited, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=400)
    return process.returncode or 0, out.decode(), err.decode()


def check_outcomes(outcomes: dict[str, Outcome], json_error: tuple[str, ...]) -> None:
    """Plain examples print a reply; stop_sequence.py stops; json_mode.py prints a recipe or
    fails with the reference's json_validate_failed (the 135M model loops inside the JSON until
    max_tokens; the benchmark engine writes no JSON), raised as the given error text."""
    for name in PLAIN:
        code, out, err = outcomes[name]
        assert code == 0, f"{name} failed:\n{err}"
        assert out.strip(), f"{name} printed nothing"
    assert ", 6" not in outcomes["stop_sequence.py"][1]
    code, out, err = outcomes["json_mode.py"]
    if code == 0:
        assert out.startswith("Recipe:")
    else:
        assert all(text in err for text in json_error), err
