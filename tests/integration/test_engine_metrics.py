"""The worker exports vLLM's own view of its load: KV cache, scheduler queues, prefix cache."""

from chat.v1 import chat_pb2_grpc
from tests.integration.stack import MODEL, Stack, chat_request, scrape


def metric(stack: Stack, name: str) -> float:
    return scrape(stack.worker_metrics_ports[0])[f'{name}{{model="{MODEL}"}}']


async def test_engine_stats_show_a_running_generation(
    aio_stub: chat_pb2_grpc.ChatServiceStub, stack: Stack
) -> None:
    # Greedy, so the generation is the same long one every run (sampling could end it early).
    request = chat_request("Count from 1 to 200, separated by commas.", max_tokens=300, temperature=0)
    call = aio_stub.StreamChatCompletion(request)
    seen: list[dict[str, float]] = []
    # vLLM reports its stats with each engine step: look after each chunk while the stream runs.
    async for response in call:
        if response.choices and response.choices[0].finish_reason:
            break
        seen.append(
            {
                name: metric(stack, name)
                for name in ("chat_worker_kv_cache_usage_ratio", "chat_worker_decoding_requests")
            }
        )
        if seen[-1]["chat_worker_decoding_requests"] >= 1:
            break
    call.cancel()
    assert seen, "the stream ended before any chunk"
    running = seen[-1]
    assert running["chat_worker_decoding_requests"] >= 1, seen
    assert 0 < running["chat_worker_kv_cache_usage_ratio"] < 1, seen


async def test_a_repeated_prompt_hits_the_prefix_cache(
    aio_stub: chat_pb2_grpc.ChatServiceStub, stack: Stack
) -> None:
    # Long enough to fill whole KV blocks (128 tokens each on CPU), which is what vLLM caches.
    request = chat_request(
        "Summarise this: " + "the quick brown fox jumps over the lazy dog. " * 20, max_tokens=2
    )
    hits_before = metric(stack, "chat_worker_prefix_cache_hits_total")
    queries_before = metric(stack, "chat_worker_prefix_cache_queries_total")
    await aio_stub.ChatCompletion(request)
    await aio_stub.ChatCompletion(request)
    assert metric(stack, "chat_worker_prefix_cache_queries_total") > queries_before
    assert metric(stack, "chat_worker_prefix_cache_hits_total") > hits_before
