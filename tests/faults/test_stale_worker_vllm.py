"""A vLLM worker frozen past the claim timeout wakes after its engine finished: the worker that
took its streams over still completes every one of them (issue 22, finding 1).

SIGSTOP stops the worker process only; vLLM's EngineCore is another process and generates on,
so when the worker wakes its generations have finished and its jobs end at once, before its
next heartbeat can notice that they were taken over. Before the fix that worker acknowledged
the jobs, deleting the pending entries and progress records of the attempts that had taken them
over: every later event of those was fenced off and all 8 callers waited to their deadline.
The benchmark engine stops with its worker, so only vLLM shows this. Prints per stream how it
ended, its tokens and its longest gap.
"""

import signal
import time

import psutil
import pytest
import redis

from common import keys
from tests.faults.conftest import check_clean
from tests.faults.test_continuation_vllm import (
    MAX_TOKENS,
    STREAMS,
    VLLM_WORKER_ENV,
    ProgressWatcher,
    assert_all_running,
    state_of,
    streams_on_one_worker,
    tokenizer,
    wait_until,
)
from tests.integration.stack import MODEL, Stack


def wait_engine_idle(worker_pid: int, timeout: float) -> float:
    """Waits until the frozen worker's engine processes use no CPU for half a second; returns when."""
    processes = psutil.Process(worker_pid).children(recursive=True)
    assert processes, "the worker has no engine processes"

    def cpu() -> float:
        total = 0.0
        for p in processes:
            try:
                times = p.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    end = time.monotonic() + timeout
    before = cpu()
    while True:
        time.sleep(0.5)
        now = cpu()
        if now - before < 0.03:
            return time.monotonic()
        before = now
        assert time.monotonic() < end, f"the frozen worker's engine still computes after {timeout:.0f}s"


# Frozen this close to the end, worker-0's engine finishes its streams well before worker-1, which
# first waits out the claim timeout and prefills every stream again, can finish them.
TOKENS_LEFT_AT_FREEZE = 60


@pytest.mark.timeout(900)
def test_a_vllm_worker_woken_after_a_takeover_leaves_the_streams_to_their_new_worker(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    readers, threads, slowness = streams_on_one_worker(fault_stack, fault_redis_client)
    fault_stack.start_worker(**VLLM_WORKER_ENV)
    fault_stack.wait_worker_ready()
    assert_all_running(readers)
    watcher = ProgressWatcher(fault_redis_client, [r.request_id for r in readers])
    near_end = MAX_TOKENS - TOKENS_LEFT_AT_FREEZE
    wait_until(
        lambda: min(len(p.token_ids) for p in watcher.snapshot().values()) >= near_end,
        300 * slowness,
        f"every stream to pass {near_end} tokens",
    )
    watcher.start()
    frozen = fault_stack.workers[0]
    frozen.send_signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:

        def all_taken_over() -> bool:
            pending = fault_redis_client.xpending_range(
                keys.job_stream(MODEL), keys.WORKER_GROUP, "-", "+", 100
            )
            return len(pending) == STREAMS and {p["consumer"] for p in pending} == {b"worker-1"}

        wait_until(all_taken_over, 30 * slowness, "worker-1 to take over every stream")
        taken_at = time.monotonic()
        # worker-0's engine generates on while its worker sleeps: wake the worker once it is done.
        idle_at = wait_engine_idle(frozen.pid, 120 * slowness)
        running_at_wake = sum(state_of(r) == "running" for r in readers)
    finally:
        frozen.send_signal(signal.SIGCONT)
    print(
        f"\nworker-0 frozen {TOKENS_LEFT_AT_FREEZE} tokens before the end; taken over after"
        f" {taken_at - frozen_at:.1f}s; its engine idle after {idle_at - frozen_at:.1f}s;"
        f" woken with {running_at_wake} of {STREAMS} streams still running on worker-1"
    )
    for thread in threads:
        thread.join(timeout=300 * slowness)
    watcher.stop()
    print("stream  outcome   tokens  longest-gap")
    for k, r in enumerate(readers):
        tokens = r.last.usage.completion_tokens if r.last and not r.error else 0
        print(f"{k:>6}  {state_of(r):<16}  {tokens:>6}  {r.longest_gap:>10.2f}s")
    # Otherwise worker-0 woke when nothing was left to break, and the run proves nothing.
    assert running_at_wake > 0, "worker-1 had finished every stream before worker-0 woke"
    for r in readers:
        assert r.error is None, r.error
        assert r.last is not None and r.last.choices[0].finish_reason in ("length", "stop")
        # Every token once: what the caller received is the text of the job's last record, which
        # worker-1's attempt wrote after continuing from worker-0's tokens.
        final = watcher.latest[r.request_id]
        assert final.attempt == 2
        assert len(final.token_ids) <= r.last.usage.completion_tokens <= MAX_TOKENS
        text = tokenizer().decode(list(final.token_ids), skip_special_tokens=True)
        assert r.text[: final.released_chars] == text[: final.released_chars]
    assert frozen.poll() is None  # the woken worker lives on
    check_clean(fault_stack, fault_redis_client)
