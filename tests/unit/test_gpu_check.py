"""`make gpu-check` (gpu/check.sh, bench/gpu_*.py): its figures, its verdicts and its pins.

The run itself needs a GPU; what it concludes from what it measured is checked here.
"""

import importlib.util
import re
from pathlib import Path

import pytest

from bench.gpu_clients import Stream, collect, shares
from bench.gpu_report import StreamTimes, figures, markdown, merge, ratios
from bench.gpu_summary import conformance, steps_table
from worker.config import WorkerSettings
from worker.engine.base import GenerationRequest, SamplingParams
from worker.engine.vllm import sampling_params

REPO = Path(__file__).resolve().parents[2]


def stream(start: float, arrivals: list[float], tokens: int) -> Stream:
    s = Stream(start=start, arrivals=arrivals)
    s.tokens = tokens
    return s


def test_a_stream_counts_only_when_it_ran_to_the_tokens_asked_for() -> None:
    times = collect([stream(0.0, [0.1, 0.2, 0.4], 4), stream(0.0, [0.3], 3)], 4, start=10.0, end=12.0)
    assert (times.requests, times.errors, times.tokens, times.chunks) == (2, 1, 4, 3)
    assert times.ttft == [0.1]
    assert times.itl == pytest.approx([0.1, 0.2])
    assert times.error_examples == ["got 3 tokens, expected 4"]


def test_client_processes_merge_over_their_common_wall_clock() -> None:
    a = StreamTimes(start=100.0, end=102.0, requests=2, tokens=400, chunks=200, ttft=[0.1, 0.3], itl=[0.01])
    b = StreamTimes(start=100.5, end=104.0, requests=2, tokens=400, chunks=100, ttft=[0.2, 0.4], itl=[0.02])
    merged = figures(merge([a, b]))
    assert merged["tokens_per_second"] == 200.0  # 800 tokens from 100.0 to 104.0
    assert merged["seconds"] == 4.0
    assert (merged["ttft_p50_ms"], merged["ttft_p99_ms"]) == (300.0, 400.0)
    assert merged["tokens_per_chunk"] == pytest.approx(2.67)
    assert StreamTimes.from_json(a.to_json()) == a


@pytest.mark.parametrize(
    ("streams", "clients", "expected"), [(256, 8, [32] * 8), (10, 4, [3, 3, 2, 2]), (2, 8, [1, 1])]
)
def test_streams_are_shared_evenly_between_client_processes(
    streams: int, clients: int, expected: list[int]
) -> None:
    assert shares(streams, clients) == expected


def result(tokens_per_second: float, ttft: float) -> dict[str, float]:
    return figures(
        StreamTimes(start=0, end=1, requests=1, tokens=int(tokens_per_second), chunks=1, ttft=[ttft])
    )


def test_ratios_and_the_goal_verdict() -> None:
    results = {"engine": result(1000, 0.1), "vllm": result(700, 0.2), "stack": result(980, 0.1)}
    assert ratios(results) == {
        "tokens_per_second (c)/(a)": 0.98,
        "ttft_p50 (c)/(a)": 1.0,
        "tokens_per_second (c)/(b)": 1.4,
        "ttft_p50 (c)/(b)": 0.5,
    }
    page = markdown({"engine": "vllm"}, results, {"http": "timed out after 30 s"})
    assert "Goal (c) ≥ 0.97 × (a) in tokens/s: met (0.980)." in page
    assert "| (c) full stack, gRPC | 980 |" in page
    assert "(d) full stack, HTTP SSE: not measured: timed out after 30 s" in page
    results["stack"] = result(900, 0.1)
    assert "not met (0.900)" in markdown({}, results, {})


def test_without_the_stack_there_are_no_ratios() -> None:
    assert ratios({"engine": result(1000, 0.1)}) == {}


def test_steps_table_names_timeouts() -> None:
    assert steps_table([("kit", 0, 4.2), ("conformance", 124, 150), ("threeway", 1, 3)])[2:] == [
        "| kit | ok | 4 |",
        "| conformance | timed out | 150 |",
        "| threeway | failed (exit 1) | 3 |",
    ]


def test_conformance_line_from_junit(tmp_path: Path) -> None:
    report = tmp_path / "conformance.xml"
    report.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase name="test_a"/><testcase name="test_b"><failure/></testcase>'
        '<testcase name="test_c"><skipped/></testcase></testsuite></testsuites>'
    )
    assert conformance(report, tmp_path / "none.log") == "1 passed, 1 failed, 1 skipped of 3 (failed: test_b)"
    log = tmp_path / "conformance.log"
    log.write_text("...\n16 tests collected in 0.3s\n")
    assert conformance(tmp_path / "none.xml", log).endswith("`16 tests collected in 0.3s`")


@pytest.mark.parametrize(("text", "expected"), [("", False), ("0", False), ("1", True)])
def test_ignore_eos_is_a_benchmark_setting_off_by_default(text: str, expected: bool) -> None:
    settings = WorkerSettings.from_env({"WORKER_VLLM_IGNORE_EOS": text})
    assert settings.vllm.ignore_eos is expected
    request = GenerationRequest("r", [1, 2], SamplingParams(max_tokens=4))
    assert sampling_params(request, ignore_eos=settings.vllm.ignore_eos).ignore_eos is expected


def test_ignore_eos_refuses_other_values() -> None:
    with pytest.raises(ValueError, match="WORKER_VLLM_IGNORE_EOS must be 0 or 1, got 'yes'"):
        WorkerSettings.from_env({"WORKER_VLLM_IGNORE_EOS": "yes"})


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;#]+)", line):
            found[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return found


def test_the_gpu_wheels_are_the_projects_pins() -> None:
    spec = importlib.util.spec_from_file_location("install_deps", REPO / "gpu" / "install_deps.py")
    assert spec is not None and spec.loader is not None
    install_deps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install_deps)
    carried, image = install_deps.read_requirements(REPO / "gpu" / "requirements.txt")
    assert set(image) == {
        "aiohttp",
        "prometheus-client",
        "psutil",
        "uvloop",
        "pygments",
        "hypothesis",
        "sortedcontainers",
    }
    project = pins(REPO / "requirements.txt") | pins(REPO / "requirements-dev.txt")
    for name, version in (carried | image).items():
        if name in project:
            assert project[name] == version, f"gpu/requirements.txt pins {name}=={version}"
    assert {"grpcio", "protobuf", "redis", "pytest", "pytest-asyncio"} <= set(carried)
