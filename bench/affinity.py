"""Prefix-cache hits with several vLLM workers, under cache pressure: cache-affine placement
(gateway/placement.py, issue 23) against taking jobs as they come, and against one worker.

Many conversations, each over a document of its own (no prefix shared between them), run turn
after turn: turn k + 1's prompt extends turn k's, so a worker that served turn k holds most of
turn k + 1's prompt in its prefix cache, if nothing evicted it. Each worker's KV cache holds
about half of all the conversations' contexts. Layouts, one after the other in one run:
  two       2 vLLM workers, each with the KV cache below, taking jobs as they come
            (GATEWAY_CACHE_AFFINITY=off: the placement before issue 23)
  affinity  the same 2 workers with cache-affine placement (the default)
  one       1 vLLM worker with twice that KV cache: the same total cache, every turn where its
            history is (the ceiling)
  pinned    2 stacks of 1 such worker, each conversation always on the same one: perfect
            affinity with no load balance (not run unless named)
  skewed-two, skewed-affinity
            as two and affinity, with half the conversations under one prompt_cache_key: a hot
            key, which placement must spread once its worker is over its share of the load
Per layout: the prefix cache hit rate (tokens found / tokens looked up, from the workers' own
counters), TTFT p50/p99, output tokens/s, each worker's share of the jobs, the gateway's
placements by outcome, and, sampled every 0.25 s, how far the busiest worker's running
sequences went above the mean.

Writes docs/benchmarks/affinity.md and docs/benchmarks/affinity.json.

    .venv/bin/python -m bench.affinity [--conversations 16] [--document-tokens 600] [--turns 4]
        [--layouts two,affinity,one,skewed-two,skewed-affinity]
"""

import argparse
import asyncio
import json
import math
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import grpc
import redis

from chat.v1 import chat_pb2, chat_pb2_grpc
from common import keys
from common.model_store import DEFAULT_MODEL_NAME
from common.models import Message, ModelSpec, PromptRenderer
from devstack import processes
from devstack.redis_server import RedisServer, free_port
from gateway.metrics import PLACEMENT_OUTCOMES
from tests.integration.stack import scrape
from worker.metrics import PREFIX_CACHE_HITS, PREFIX_CACHE_QUERIES

DEFAULT_LAYOUTS = ("two", "affinity", "one", "skewed-two", "skewed-affinity")
EPSILON = 0.5  # GATEWAY_AFFINITY_EPSILON's default, the gateways' here unless --epsilon
OUTCOMES = PLACEMENT_OUTCOMES
REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "benchmarks"
LOGS = REPO / ".run" / "bench-affinity"
MODEL = DEFAULT_MODEL_NAME
# SmolLM2-135M: 30 layers x 3 KV heads x 64 dims x (K and V), in float32 (bfloat16: half).
KV_BYTES_PER_TOKEN = 30 * 3 * 64 * 2 * 4
_VOCABULARY = (
    "river mountain engine harbor lantern orchard copper meadow signal canyon ledger violet"
    " compass granite thunder beacon valley anchor summit falcon willow ember quarry glacier"
    " market tunnel saddle prairie cobalt marble harvest pepper island vessel ribbon timber"
    " garden rocket silver canvas meteor fossil walnut spindle kettle bridge cotton plateau"
)
WORDS = _VOCABULARY.split()


def document(rng: random.Random, renderer: PromptRenderer, tokens: int) -> str:
    """Sentences of random words, about `tokens` long: a context no other conversation shares."""
    sentences: list[str] = []
    while len(renderer.tokenizer(" ".join(sentences))["input_ids"]) < tokens:
        words = rng.choices(WORDS, k=12)
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


class Layout:
    """A redis-server, a gateway and `workers` vLLM workers, each with kv_cache_gib of KV cache."""

    def __init__(
        self, name: str, workers: int, kv_cache_gib: float, affinity: bool = True, epsilon: float = EPSILON
    ) -> None:
        self.name = name
        self.redis = RedisServer(LOGS / f"redis-{name}")
        self.address = f"127.0.0.1:{free_port()}"
        self.metrics_ports = [free_port() for _ in range(workers)]
        self.gateway_metrics_port = free_port()
        self.kv_cache_gib = kv_cache_gib
        self.affinity = affinity
        self.epsilon = epsilon
        self.processes: list[Any] = []

    def start(self) -> None:
        self.redis.start()
        env = {"REDIS_URL": self.redis.url, "GATEWAY_ADDRESS": self.address,
               "GATEWAY_METRICS_PORT": str(self.gateway_metrics_port),
               "GATEWAY_HTTP_ADDRESS": f"127.0.0.1:{free_port()}", "GATEWAY_NO_WORKER": "queue",
               "GATEWAY_CACHE_AFFINITY": "on" if self.affinity else "off",
               "GATEWAY_AFFINITY_EPSILON": str(self.epsilon)}  # fmt: skip
        gateway = processes.launch("gateway", env, LOGS / f"{self.name}-gateway.log")
        self.processes.append(gateway)
        processes.wait_serving(self.address, gateway)
        for k, port in enumerate(self.metrics_ports):
            worker_env = {
                **env,
                "WORKER_ENGINE": "vllm",
                "WORKER_ID": f"{self.name}-w{k}",
                "WORKER_METRICS_PORT": str(port),
                "WORKER_VLLM_KV_CACHE_GIB": f"{self.kv_cache_gib:.3f}",
                "WORKER_MAX_CONCURRENCY": "4",
                "WORKER_VLLM_DTYPE": "float32",  # the KV cache sizes below assume it (auto may be bf16)
                # vLLM wants room for one whole context in the KV cache: these small caches need
                # a context window to match (the longest prompt here is well under it).
                "WORKER_VLLM_MAX_MODEL_LEN": "2048",
            }
            self.processes.append(processes.launch("worker", worker_env, LOGS / f"{self.name}-w{k}.log"))
        client = redis.Redis.from_url(self.redis.url)
        end = time.monotonic() + 600
        # A worker advertises itself in the engine registry once its engine is ready.
        while client.hlen(keys.engines(MODEL)) < len(self.metrics_ports):
            assert time.monotonic() < end, f"{self.name}: workers not live after 600 s (logs in {LOGS})"
            exited = [p.args for p in self.processes if p.poll() is not None]
            assert not exited, f"{self.name}: {exited} exited while starting (logs in {LOGS})"
            time.sleep(1)
        client.close()
        time.sleep(1.5)  # the gateway's view of the workers (placement needs both) refreshes every second

    def placements(self) -> dict[str, float]:
        """The gateway's placements so far, by outcome."""
        prefix = f'chat_gateway_placements_total{{model="{MODEL}",outcome="'
        values = scrape(self.gateway_metrics_port)
        return {
            k.removeprefix(prefix).removesuffix('"}'): v for k, v in values.items() if k.startswith(prefix)
        }

    def running(self) -> list[float]:
        """Sequences each worker's engine runs now."""
        return [
            sum(v for k, v in scrape(port).items() if k.startswith("chat_worker_running_requests{"))
            for port in self.metrics_ports
        ]

    def counters(self) -> list[dict[str, float]]:
        """Per worker: prefix cache queries and hits (tokens), jobs ended."""
        rows = []
        for port in self.metrics_ports:
            values = scrape(port)
            rows.append(
                {
                    "queries": values.get(f'{PREFIX_CACHE_QUERIES}_total{{model="{MODEL}"}}', 0.0),
                    "hits": values.get(f'{PREFIX_CACHE_HITS}_total{{model="{MODEL}"}}', 0.0),
                    "jobs": sum(v for k, v in values.items() if k.startswith("chat_worker_jobs_total{")),
                }
            )
        return rows

    def stop(self) -> None:
        for process in reversed(self.processes):
            processes.stop(process)
        self.redis.stop()


async def converse(
    stub: chat_pb2_grpc.ChatServiceStub,
    doc: str,
    turns: int,
    reply_tokens: int,
    gate: asyncio.Semaphore,
    cache_key: str = "",
) -> list[tuple[float, int]]:
    """One conversation, turn after turn; returns each turn's (TTFT, completion tokens)."""
    messages = [
        chat_pb2.ChatMessage(role="system", content=f"Answer questions about this document.\n\n{doc}")
    ]
    results = []
    for turn in range(turns):
        messages.append(
            chat_pb2.ChatMessage(role="user", content=f"Question {turn + 1}: what is the document about?")
        )
        request = chat_pb2.ChatCompletionRequest(
            model=MODEL, messages=messages, max_tokens=reply_tokens, temperature=0, prompt_cache_key=cache_key
        )
        async with gate:
            start, first, text, tokens = time.perf_counter(), 0.0, "", 0
            async for chunk in stub.StreamChatCompletion(request, timeout=900):
                if chunk.choices and chunk.choices[0].delta.content and not first:
                    first = time.perf_counter() - start
                text += "".join(c.delta.content for c in chunk.choices)
                if chunk.HasField("usage"):
                    tokens = chunk.usage.completion_tokens
        results.append((first, tokens))
        messages.append(chat_pb2.ChatMessage(role="assistant", content=text))
    return results


async def sample_running(stacks: list[Layout], samples: list[list[float]]) -> None:
    """Every worker's running sequences, every 0.25 s, until cancelled."""
    while True:
        samples.append(await asyncio.to_thread(lambda: [n for stack in stacks for n in stack.running()]))
        await asyncio.sleep(0.25)


def overload(samples: list[list[float]], epsilon: float) -> dict[str, float]:
    """Of the samples where anything ran: the busiest worker's running sequences over the mean, at
    its highest, and how often it ran more than (1 + epsilon) x the mean, rounded up (sequences
    are whole: with 1 running on 2 workers, the busiest runs twice the mean, within the bound)."""
    busy = [s for s in samples if sum(s) > 0]
    means = [sum(s) / len(s) for s in busy]
    return {
        "peak_over_mean": max((max(s) / m for s, m in zip(busy, means, strict=True)), default=0.0),
        "share_above_bound": sum(
            max(s) > math.ceil((1 + epsilon) * m - 1e-9) for s, m in zip(busy, means, strict=True)
        )
        / max(1, len(busy)),
        "samples": len(busy),
    }


async def run_load(
    stacks: list[Layout], docs: list[str], args: argparse.Namespace, hot_key: str = ""
) -> dict[str, Any]:
    """The conversations, conversation i on stacks[i % len(stacks)], `concurrency` turns in flight
    in all (with hot_key: every other conversation under that prompt_cache_key); the counters of
    every stack's workers, in order."""
    before = [row for stack in stacks for row in stack.counters()]
    placed_before = [stack.placements() for stack in stacks]
    gate = asyncio.Semaphore(args.concurrency)
    channels = [grpc.aio.insecure_channel(stack.address) for stack in stacks]
    stubs = [chat_pb2_grpc.ChatServiceStub(channel) for channel in channels]
    samples: list[list[float]] = []
    sampler = asyncio.create_task(sample_running(stacks, samples))
    start = time.perf_counter()
    per_conversation = await asyncio.gather(
        *(
            converse(
                stubs[i % len(stubs)], doc, args.turns, args.reply_tokens, gate, hot_key if i % 2 else ""
            )
            for i, doc in enumerate(docs)
        )
    )
    seconds = time.perf_counter() - start
    sampler.cancel()
    for channel in channels:
        await channel.close()
    placed = {
        outcome: sum(
            stack.placements().get(outcome, 0.0) - b.get(outcome, 0.0)
            for stack, b in zip(stacks, placed_before, strict=True)
        )
        for outcome in OUTCOMES
    }
    after = [row for stack in stacks for row in stack.counters()]
    turns = [t for conversation in per_conversation for t in conversation]
    ttfts = sorted(t for t, _ in turns if t > 0)  # a reply without text has no first token
    queries = [a["queries"] - b["queries"] for a, b in zip(after, before, strict=True)]
    hits = [a["hits"] - b["hits"] for a, b in zip(after, before, strict=True)]
    jobs = [a["jobs"] - b["jobs"] for a, b in zip(after, before, strict=True)]
    return {
        "hit_rate": sum(hits) / max(1.0, sum(queries)),
        "hit_rate_per_worker": [h / max(1.0, q) for h, q in zip(hits, queries, strict=True)],
        "ttft_p50": statistics.median(ttfts),
        "ttft_p99": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))],
        "tokens_per_second": sum(n for _, n in turns) / seconds,
        "jobs_per_worker": jobs,
        "seconds": seconds,
        "requests": len(turns),
        "placements": placed,
        "load": overload(samples, args.epsilon),
    }


def run_layout(
    stacks: list[Layout], docs: list[str], args: argparse.Namespace, hot_key: str = ""
) -> dict[str, Any]:
    try:
        for stack in stacks:
            stack.start()
        return asyncio.run(run_load(stacks, docs, args, hot_key))
    finally:
        for stack in stacks:
            stack.stop()


def run_meta(args: argparse.Namespace) -> dict[str, Any]:
    """When, where and with what arguments a bench ran: the head of its JSON and Markdown."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, 2 cores",
        "args": vars(args),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--document-tokens", type=int, default=600)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--reply-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4, help="turns in flight at once")
    parser.add_argument(
        "--layouts", default=",".join(DEFAULT_LAYOUTS), help="comma-separated, run in this order"
    )
    parser.add_argument(
        "--epsilon", type=float, default=EPSILON, help="GATEWAY_AFFINITY_EPSILON of the gateways"
    )
    parser.add_argument("--out", default="affinity", help="writes docs/benchmarks/<out>.md and <out>.json")
    args = parser.parse_args()
    LOGS.mkdir(parents=True, exist_ok=True)
    renderer = PromptRenderer(ModelSpec.parse(MODEL))
    rng = random.Random(23)
    docs = [document(rng, renderer, args.document_tokens) for _ in range(args.conversations)]
    # A conversation's context at its last turn: the document, the questions and the replies.
    context = len(renderer.render([Message("system", docs[0])])) + args.turns * (args.reply_tokens + 20)
    all_contexts_gib = args.conversations * context * KV_BYTES_PER_TOKEN / (1 << 30)
    per_worker = all_contexts_gib / 2  # each of two workers holds about half of them
    results: dict[str, Any] = {}
    layouts = {
        "two": lambda: [Layout("two", 2, per_worker, affinity=False)],
        "affinity": lambda: [Layout("affinity", 2, per_worker, epsilon=args.epsilon)],
        "one": lambda: [Layout("one", 1, 2 * per_worker)],
        # Two stacks of one worker, each conversation always on the same one: perfect affinity
        # without load balance, at the same compute and KV cache as `two`.
        "pinned": lambda: [Layout("pinned-a", 1, per_worker), Layout("pinned-b", 1, per_worker)],
        "skewed-two": lambda: [Layout("skewed-two", 2, per_worker, affinity=False)],
        "skewed-affinity": lambda: [Layout("skewed-affinity", 2, per_worker, epsilon=args.epsilon)],
    }
    for name in args.layouts.split(","):
        hot_key = "hot" if name.startswith("skewed") else ""
        results[name] = run_layout(layouts[name](), docs, args, hot_key)
        print(name, json.dumps(results[name]), flush=True)
    meta = {
        **run_meta(args),
        "context_tokens": context,
        "kv_cache_gib_per_worker_two": round(per_worker, 3),
        "all_contexts_gib": round(all_contexts_gib, 3),
    }
    (OUT / f"{args.out}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    write_markdown(meta, results, OUT / f"{args.out}.md")


def write_markdown(meta: dict[str, Any], results: dict[str, Any], path: Path) -> None:
    a = meta["args"]
    rows = [
        f"| {name} | {r['hit_rate']:.3f} ({', '.join(f'{h:.3f}' for h in r['hit_rate_per_worker'])})"
        f" | {r['ttft_p50'] * 1000:.0f} / {r['ttft_p99'] * 1000:.0f} | {r['tokens_per_second']:.1f}"
        f" | {' / '.join(str(int(j)) for j in r['jobs_per_worker'])}"
        f" | {' / '.join(str(int(r['placements'][o])) for o in OUTCOMES)}"
        f" | {r['load']['peak_over_mean']:.2f}, {r['load']['share_above_bound']:.0%} | {r['seconds']:.0f} |"
        for name, r in results.items()
    ]
    path.write_text(
        "# Prefix cache under pressure: cache-affine placement, jobs as they come, one worker\n\n"
        f"`.venv/bin/python -m bench.affinity --layouts {','.join(results)} --epsilon {a['epsilon']}`"
        f" ({meta['date']},"
        f" {meta['machine']}; vLLM on CPU, float32).\n"
        f"{a['conversations']} conversations, each over its own document of about"
        f" {a['document_tokens']} tokens, {a['turns']} turns of {a['reply_tokens']}-token greedy replies,"
        f" {a['concurrency']} turns in flight;"
        f" a conversation's context reaches about {meta['context_tokens']} tokens, all of them"
        f" {meta['all_contexts_gib']} GiB of KV cache. Layouts `two` (jobs as they come,"
        " `GATEWAY_CACHE_AFFINITY=off`) and `affinity` (cache-affine placement, the default): 2 workers"
        f" of {meta['kv_cache_gib_per_worker_two']} GiB each (half of all contexts each); `one`: 1 worker"
        " with twice that (the ceiling); `skewed-*`: as `two` and `affinity` with every other"
        " conversation under one `prompt_cache_key`. vLLM on CPU binds each engine to core 0 (core 1"
        " is left to the processes' front ends), so all layouts run their engines on the same one core."
        " Turn 1 of each conversation cannot hit (no worker has its document yet), which bounds every"
        " hit rate below 1. Placements: the gateway's `chat_gateway_placements_total` by outcome"
        " (preferred / spilled / unmatched / moved). Load: sampled every 0.25 s while anything ran,"
        " the busiest worker's running sequences over the mean at their highest, and the share of"
        f" samples where it ran more than (1 + {a['epsilon']}) x the mean, rounded up.\n\n"
        "| layout | prefix cache hit rate (per worker) | TTFT p50 / p99 ms | output tokens/s"
        " | jobs per worker | placements | load: peak / mean, above bound | seconds |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


if __name__ == "__main__":
    main()
