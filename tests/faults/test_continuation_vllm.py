"""A vLLM worker holding 8 long streams is SIGKILLed: another vLLM worker continues all of them.

Real engine, real model, default heartbeat and claim timeout. Each stream must complete
with no token missing or repeated, checked against the jobs' progress records: the record
of the killed worker (what the other worker continued from) is a prefix of the final one,
the text a caller received decodes from the recorded tokens, and the other worker generated
only the tokens that came after. Prints per stream: outcome, tokens continued from, the gap
across the takeover and the longest gap. About 100 s on 2 cores (two vLLM workers start).

Nothing here assumes the machine's speed: the test waits until every stream has its first
chunk and is still running before it kills, and the gap bound scales with a probe generation
timed at the start (tests/speed.py), so a machine without native bfloat16 passes as well.
"""

import functools
import signal
import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest
import redis
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from chat.v1 import chat_pb2, chat_pb2_grpc
from common import codec, keys
from common.models import ModelSpec
from tests.faults.conftest import check_clean
from tests.faults.helpers import started
from tests.integration.stack import MODEL, Stack, chat_request, scrape
from tests.speed import engine_slowness

STREAMS = 8
MAX_TOKENS = 1000
# Greedy SmolLM2-135M counts on past 1,200 tokens for both in float32 and bfloat16 alike.
# ("Write the numbers from 1 to 10000, one per line." stops after 122 tokens in float32 and ran
# past 1,000 only in bfloat16: the float32 default on CPUs without native bf16 ended half the
# streams before the kill.)
PROMPTS = (
    "Count from 7 to 5000, separated by commas.",
    "List the integers from 1 to 3000 in order, separated by spaces.",
)
# The gap across the kill on the reference machine stays under this (2.3-2.7 s idle, up to
# 4.9 s under CI load: the survivor prefills 8 x ~750 tokens); scaled by the probe's slowness.
GAP_BOUND_SECONDS = 9.0
VLLM_WORKER_ENV = {"WORKER_ENGINE": "vllm", "WORKER_MAX_CONCURRENCY": str(STREAMS)}


@dataclass
class StreamReader:
    """Reads one stream in a thread, recording each chunk's arrival time."""

    request: chat_pb2.ChatCompletionRequest
    text: str = ""
    times: list[float] = field(default_factory=list)
    last: chat_pb2.ChatCompletionChunk | None = None
    error: grpc.RpcError | None = None
    request_id: str = ""
    logprob_tokens: list[str] = field(default_factory=list)  # of the chunks' logprobs, if asked for

    def run(self, stub: chat_pb2_grpc.ChatServiceStub) -> None:
        try:
            for chunk in stub.StreamChatCompletion(self.request, timeout=300):
                self.request_id = chunk.id.removeprefix("chatcmpl-")
                self.times.append(time.monotonic())
                self.text += chunk.choices[0].delta.content
                self.logprob_tokens += [entry.token for entry in chunk.choices[0].logprobs.content]
                self.last = chunk
        except grpc.RpcError as exc:
            self.error = exc

    def gap_across(self, moment: float) -> float:
        """From the last chunk before `moment` to the first one after it."""
        before = [t for t in self.times if t <= moment]
        after = [t for t in self.times if t > moment]
        return (after[0] if after else float("inf")) - (before[-1] if before else moment)

    @property
    def longest_gap(self) -> float:
        return max((b - a for a, b in zip(self.times, self.times[1:], strict=False)), default=0.0)


class ProgressWatcher:
    """Keeps the latest progress record of each job until the job deletes it."""

    def __init__(self, client: redis.Redis, request_ids: list[str]) -> None:
        self.latest: dict[str, codec.Progress] = {}
        self._client = client
        self._ids = request_ids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def snapshot(self) -> dict[str, codec.Progress]:
        records = self._client.mget([keys.progress(i) for i in self._ids])
        return {i: codec.decode_progress(r) for i, r in zip(self._ids, records, strict=True) if r is not None}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.latest.update(self.snapshot())


def wait_until(condition: object, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < end, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.05)


def state_of(reader: StreamReader) -> str:
    if reader.error is not None:
        return f"error {reader.error.code().name}"
    if reader.last is None:
        return "no chunk yet"
    finish = reader.last.choices[0].finish_reason
    return f"finished ({finish})" if finish else "running"


def assert_all_running(readers: list[StreamReader]) -> None:
    """Every stream has had content and none has ended (each line says why one is not running)."""
    stopped = [f"stream {k}: {state_of(r)} after {len(r.times)} chunks" for k, r in enumerate(readers)]
    stopped = [line for line, r in zip(stopped, readers, strict=True) if state_of(r) != "running"]
    assert not stopped, "streams not running when they had to be:\n" + "\n".join(stopped)


@pytest.mark.timeout(900)  # two vLLM starts and 8 x 1000 tokens: minutes on a CPU without native bf16
def test_sigkill_of_a_vllm_worker_holding_8_long_streams(
    fault_stack: Stack, fault_redis_client: redis.Redis
) -> None:
    readers, threads, slowness = streams_on_one_worker(fault_stack, fault_redis_client)
    fault_stack.start_worker(**VLLM_WORKER_ENV)
    fault_stack.wait_worker_ready()  # worker-0 is full: the one-token request proves worker-1 serves
    watcher = ProgressWatcher(fault_redis_client, [r.request_id for r in readers])
    assert_all_running(readers)
    fault_stack.workers[0].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    generated_before = generated_tokens(fault_stack.worker_metrics_ports[1])
    taken_over = watcher.snapshot()  # what worker-0 had published, and worker-1 continues from
    watcher.start()
    for thread in threads:
        thread.join(timeout=300 * slowness)
    watcher.stop()
    generated = generated_tokens(fault_stack.worker_metrics_ports[1]) - generated_before
    print(
        f"\n{STREAMS} streams x {MAX_TOKENS} tokens,"
        f" worker-0 SIGKILLed {killed_at - readers[0].times[0]:.1f}s after the first token"
    )
    gap_bound = GAP_BOUND_SECONDS * slowness
    continued = sum(
        check_stream(k, r, killed_at, taken_over, watcher.latest, gap_bound) for k, r in enumerate(readers)
    )
    print(f"worker-1 generated {generated:.0f} tokens for the {continued} that followed the takeover")
    assert generated == continued  # nothing generated again
    outcomes = scrape(fault_stack.gateway_metrics_port)
    assert outcomes[f'chat_gateway_resumed_streams_total{{model="{MODEL}",outcome="continued"}}'] == STREAMS
    check_clean(fault_stack, fault_redis_client)


def streams_on_one_worker(
    stack: Stack, client: redis.Redis
) -> tuple[list[StreamReader], list[threading.Thread], float]:
    """Starts the gateway and worker-0, and 8 long streams that all run on it; returns them and
    the machine's slowness, probed before the streams start."""
    stub = started(stack, 1, **VLLM_WORKER_ENV)
    slowness = engine_slowness(stub)
    prompts = [PROMPTS[k % len(PROMPTS)] for k in range(STREAMS)]
    # Half the streams ask for logprobs: they must go on across the takeover, one per token.
    readers = [
        StreamReader(chat_request(p, max_tokens=MAX_TOKENS, temperature=0, logprobs=k % 2 == 1))
        for k, p in enumerate(prompts)
    ]
    threads = [threading.Thread(target=r.run, args=(stub,), daemon=True) for r in readers]
    for thread in threads:
        thread.start()
    # The engine prefills 8 prompts before any stream's first chunk: seconds, or a minute where
    # bfloat16 is emulated. Wait for what is needed, each stream's first content, not a time.
    wait_until(
        lambda: all(r.text or r.error or (r.last and r.last.choices[0].finish_reason) for r in readers),
        120 * slowness,
        "every stream's first content chunk",
    )
    assert_all_running(readers)
    pending = client.xpending_range(keys.job_stream(MODEL), keys.WORKER_GROUP, "-", "+", 100)
    assert {p["consumer"] for p in pending} == {b"worker-0"} and len(pending) == STREAMS
    return readers, threads, slowness


def check_stream(
    k: int,
    reader: StreamReader,
    killed_at: float,
    taken_over: dict[str, codec.Progress],
    latest: dict[str, codec.Progress],
    gap_bound: float,
) -> int:
    """Prints the stream's row and checks it; returns the tokens generated after the takeover."""
    if k == 0:
        print("stream  outcome   tokens  continued-from  gap-across-kill  longest-gap")
    outcome = reader.error.code().name if reader.error else reader.last.choices[0].finish_reason  # type: ignore[union-attr]
    tokens = reader.last.usage.completion_tokens if reader.last and not reader.error else 0
    first, final = taken_over[reader.request_id], latest[reader.request_id]
    print(
        f"{k:>6}  {outcome:<8}  {tokens:>6}  {len(first.token_ids):>14}"
        f"  {reader.gap_across(killed_at):>14.2f}s  {reader.longest_gap:>10.2f}s"
    )
    assert reader.error is None, reader.error
    assert outcome in ("length", "stop") and tokens <= MAX_TOKENS
    # The gap is measured and printed, not asserted tight; the bound tells the takeover at default
    # settings from the old 10.4 s one on the reference machine, scaled to this one's speed.
    assert reader.gap_across(killed_at) < gap_bound
    # No token missing or repeated: the tokens continued from begin the final record, and what
    # the caller received is the text of the recorded tokens on both sides of the takeover.
    assert final.token_ids[: len(first.token_ids)] == first.token_ids and final.attempt == 2
    assert len(first.token_ids) < len(final.token_ids) <= tokens
    for record in (first, final):
        text = tokenizer().decode(list(record.token_ids), skip_special_tokens=True)
        assert reader.text[: record.released_chars] == text[: record.released_chars]
    if reader.request.logprobs:
        # One entry per token, none twice: they spell the text (and, after "stop", its last token).
        assert len(reader.logprob_tokens) == tokens
        assert "".join(reader.logprob_tokens).startswith(reader.text)
    return tokens - len(first.token_ids)


@functools.cache
def tokenizer() -> PreTrainedTokenizerBase:
    """The model's tokenizer, loaded once."""
    return AutoTokenizer.from_pretrained(str(ModelSpec.parse(MODEL).path))


def generated_tokens(metrics_port: int) -> float:
    return scrape(metrics_port)[f'chat_worker_generated_tokens_total{{model="{MODEL}"}}']
