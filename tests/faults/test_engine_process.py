"""vLLM's processes die with their worker, and a dead engine fails its jobs and stops the worker.

These run real vLLM workers (about 20 s to start on CPU each), since the processes under
test are vLLM's own (`VLLM::EngineCore` and its model runner).
"""

import contextlib
import os
import signal
import time
from subprocess import Popen

import grpc
import psutil
import pytest

from tests.faults.helpers import TimedStream, started, status_of
from tests.integration.stack import Stack, chat_request

VLLM_WORKER_ENV = {"WORKER_ENGINE": "vllm", "WORKER_MAX_CONCURRENCY": "4"}


def engine_processes(worker: Popen[bytes]) -> list[psutil.Process]:
    """The worker's descendants that vLLM started (the reaper is ours and not counted)."""
    processes = []
    for p in psutil.Process(worker.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # short-lived ones come and go while vLLM starts
            if "worker.engine.reaper" not in " ".join(p.cmdline()):
                processes.append(p)
    return processes


def name_of(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return ""


def wait_gone(processes: list[psutil.Process], timeout: float) -> float:
    """Seconds until every process has exited (zombies count as exited); fails after timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        alive = []
        for p in processes:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"still running after {timeout}s: {[(p.pid, p.name()) for p in alive]}")


def test_a_sigkilled_worker_leaves_no_engine_process_behind(fault_stack: Stack) -> None:
    stub = started(fault_stack, 1, **VLLM_WORKER_ENV)
    worker = fault_stack.workers[0]
    engine = engine_processes(worker)
    assert any("EngineCore" in p.name() for p in engine), [p.name() for p in engine]
    stream = TimedStream(stub, chat_request("Tell me a long story.", max_tokens=500))
    stream.read(content_chunks=3)
    worker.kill()
    worker.wait()
    gone_after = wait_gone(engine, timeout=10)
    print(f"engine processes gone {gone_after:.2f}s after the worker's SIGKILL")


def test_a_worker_killed_while_the_engine_starts_leaves_no_engine_process_behind(
    fault_stack: Stack,
) -> None:
    # On a GPU the engine takes minutes to start: the time a liveness probe or a rollout may kill it in.
    fault_stack.start_gateway()
    worker = fault_stack.start_worker(**VLLM_WORKER_ENV)
    deadline = time.monotonic() + 120
    while not any("EngineCore" in name_of(p) for p in engine_processes(worker)):
        assert worker.poll() is None and time.monotonic() < deadline, "no EngineCore started"
        time.sleep(0.05)
    engine = engine_processes(worker)
    worker.kill()
    worker.wait()
    gone_after = wait_gone(engine, timeout=10)
    print(f"engine processes gone {gone_after:.2f}s after the worker's SIGKILL during start-up")


def test_a_dead_engine_fails_its_jobs_and_stops_the_worker(fault_stack: Stack) -> None:
    stub = started(fault_stack, 1, **VLLM_WORKER_ENV)
    worker = fault_stack.workers[0]
    engine = engine_processes(worker)
    [core] = [p for p in engine if "EngineCore" in p.name()]
    stream = TimedStream(stub, chat_request("Tell me a long story.", max_tokens=500))
    stream.read(content_chunks=3)
    killed_at = time.monotonic()
    os.kill(core.pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as caught:
        stream.read()
    failed_after = time.monotonic() - killed_at
    assert status_of(caught.value) == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert "engine" in caught.value.details()
    assert worker.wait(timeout=30) == 1
    wait_gone(engine, timeout=10)
    print(f"stream failed UNAVAILABLE {failed_after:.2f}s after the engine's SIGKILL; worker exited 1")
