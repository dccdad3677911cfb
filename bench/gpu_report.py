"""Figures and tables of `make gpu-check` (gpu/check.sh): pure functions, no I/O but the writers.

A run measures up to four ways of serving the same engine (bench/gpu_check.py):
  (a) engine  vLLM's AsyncLLM in-process, as the worker drives it
  (b) vllm    vLLM's OpenAI-compatible server, streamed over SSE
  (c) stack   gateway -> Redis -> one worker -> gateway, streamed over gRPC
  (d) http    the same stack through the gateway's OpenAI-compatible HTTP API, streamed as (b)
Each client reports what it saw (StreamTimes); they merge into one Figures per mode.
"""

from dataclasses import asdict, dataclass, field
from typing import Any

from bench.loadgen import percentiles

MODES = ("engine", "vllm", "stack", "http")
LABELS = {
    "engine": "(a) engine in-process",
    "vllm": "(b) vLLM's OpenAI server, SSE",
    "stack": "(c) full stack, gRPC",
    "http": "(d) full stack, HTTP SSE",
}
GOAL = 0.97  # issue 18: (c) at least 0.97 x (a) in tokens/s


@dataclass
class StreamTimes:
    """What one client process (or the in-process engine driver) saw, times in seconds."""

    start: float = 0.0  # wall clock (time.time()) when the first request was sent
    end: float = 0.0  # when the last one ended
    requests: int = 0
    errors: int = 0
    tokens: int = 0  # completion tokens of requests that completed in full
    chunks: int = 0  # pieces of content received
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)  # gaps between successive pieces of content
    error_examples: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StreamTimes":
        return cls(**data)


def merge(parts: list[StreamTimes]) -> StreamTimes:
    """One mode's clients together: their wall clock spans from the first start to the last end."""
    if not parts:
        return StreamTimes()
    return StreamTimes(
        start=min(p.start for p in parts),
        end=max(p.end for p in parts),
        requests=sum(p.requests for p in parts),
        errors=sum(p.errors for p in parts),
        tokens=sum(p.tokens for p in parts),
        chunks=sum(p.chunks for p in parts),
        ttft=[t for p in parts for t in p.ttft],
        itl=[t for p in parts for t in p.itl],
        error_examples=sorted({e for p in parts for e in p.error_examples})[:5],
    )


def figures(times: StreamTimes) -> dict[str, Any]:
    """Tokens/s over the whole wall-clock span, TTFT and ITL p50/p99 in ms."""
    seconds = times.end - times.start
    ttft, itl = percentiles(times.ttft), percentiles(times.itl)
    return {
        "tokens_per_second": round(times.tokens / seconds, 1) if seconds > 0 else 0.0,
        "ttft_p50_ms": ttft["p50"],
        "ttft_p99_ms": ttft["p99"],
        "itl_p50_ms": itl["p50"],
        "itl_p99_ms": itl["p99"],
        "seconds": round(seconds, 3),
        "requests": times.requests,
        "errors": times.errors,
        "tokens": times.tokens,
        "tokens_per_chunk": round(times.tokens / times.chunks, 2) if times.chunks else 0.0,
        "error_examples": times.error_examples,
    }


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """(c)/(a) and (c)/(b) of tokens/s and TTFT p50, for the modes that were measured."""
    out: dict[str, float] = {}
    stack = results.get("stack")
    if not stack:
        return out
    for base, name in (("engine", "a"), ("vllm", "b")):
        other = results.get(base)
        if other and other["tokens_per_second"]:
            out[f"tokens_per_second (c)/({name})"] = round(
                stack["tokens_per_second"] / other["tokens_per_second"], 3
            )
        if other and other["ttft_p50_ms"]:
            out[f"ttft_p50 (c)/({name})"] = round(stack["ttft_p50_ms"] / other["ttft_p50_ms"], 3)
    return out


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| mode | tokens/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | tokens/chunk | requests (errors) |",
        "|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        if (r := results.get(mode)) is None:
            continue
        lines.append(
            f"| {LABELS[mode]} | {r['tokens_per_second']:,.0f}"
            f" | {r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f}"
            f" | {r['itl_p50_ms']:.2f} / {r['itl_p99_ms']:.2f} | {r['tokens_per_chunk']:.2f}"
            f" | {r['requests']} ({r['errors']}) |"
        )
    return lines


def markdown(meta: dict[str, Any], results: dict[str, dict[str, Any]], skipped: dict[str, str]) -> str:
    """The comparison as gpu/check.sh writes it to $OUT/threeway.md."""
    lines = [
        "# Three-way comparison",
        "",
        *(f"- {key}: {value}" for key, value in meta.items()),
        "",
        *table(results),
        "",
    ]
    found = ratios(results)
    if found:
        lines += ["| ratio | value |", "|---|---|", *(f"| {k} | {v:.3f} |" for k, v in found.items()), ""]
    if (goal := found.get("tokens_per_second (c)/(a)")) is not None:
        verdict = "met" if goal >= GOAL else "not met"
        lines += [f"Goal (c) ≥ {GOAL} × (a) in tokens/s: {verdict} ({goal:.3f}).", ""]
    lines += [f"- {LABELS[mode]}: not measured: {why}" for mode, why in skipped.items()]
    return "\n".join(lines).rstrip() + "\n"
