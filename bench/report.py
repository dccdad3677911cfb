"""Turns bench/relay.py results into docs/benchmarks/relay.md and a plot."""

from pathlib import Path
from typing import Any

MODES = ("engine", "bare", "stack")
LABELS = {"engine": "(a) engine in-process", "bare": "(b) bare gRPC server", "stack": "(c) full stack"}


def _rows(results: dict[str, Any], scenario: str) -> list[tuple[int, dict[str, Any]]]:
    rows = [
        (int(key.split(" | ")[1]), row) for key, row in results.items() if key.startswith(scenario + " |")
    ]
    return sorted(rows)


def write_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(results, "sweep at 20 tok/s per stream")
    x = [n for n, _ in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [
        ("Time to first token p50 (ms)", lambda r: r["ttft_ms"]["p50"]),
        ("Inter-token latency p50 (ms)", lambda r: r["itl_ms"]["p50"]),
        ("Output tokens per second", lambda r: r["output_tokens_per_second"]),
    ]
    for ax, (title, value) in zip(axes, panels, strict=True):
        for mode in MODES:
            ax.plot(x, [value(row[mode]) for _, row in rows], marker="o", label=LABELS[mode])
        ax.set(title=title, xlabel="concurrent streams (20 tokens/s each)", xscale="log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Relay cost: same load on the engine alone, a bare gRPC server, and the full stack")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _table(rows: list[tuple[int, dict[str, Any]]]) -> list[str]:
    lines = [
        "| streams | mode | tokens/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | e2e p50 ms | errors"
        " | gateway µs/token | Redis cores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, row in rows:
        for mode in MODES:
            r = row[mode]
            lines.append(
                f"| {n} | {LABELS[mode]} | {r['output_tokens_per_second']:.0f} | {r['ttft_ms']['p50']:.1f} / "
                f"{r['ttft_ms']['p99']:.1f} | {r['itl_ms']['p50']:.1f} / {r['itl_ms']['p99']:.1f} | "
                f"{r['e2e_ms']['p50']:.0f} | {r['errors']} | {r.get('gateway_us_per_token', '')} | "
                f"{r.get('redis_cores', '')} |"
            )
    return lines


def _ratios(rows: list[tuple[int, dict[str, Any]]]) -> list[str]:
    lines = [
        "| streams | TTFT p50 (c)/(a) | TTFT p50 (c)/(b) | ITL p50 (c)/(b) | tokens/s (c)/(a)"
        " | tokens/s (c)/(b) |",
        "|---|---|---|---|---|---|",
    ]
    for n, row in rows:
        a, b, c = row["engine"], row["bare"], row["stack"]

        def ratio(x: float, y: float) -> str:
            return f"{x / y:.2f}" if y else "n/a"

        ttft, itl, tps = "ttft_ms", "itl_ms", "output_tokens_per_second"
        lines.append(
            f"| {n} | {ratio(c[ttft]['p50'], a[ttft]['p50'])} | {ratio(c[ttft]['p50'], b[ttft]['p50'])}"
            f" | {ratio(c[itl]['p50'], b[itl]['p50'])} | {ratio(c[tps], a[tps])} | {ratio(c[tps], b[tps])} |"
        )
    return lines


def _targets(results: dict[str, Any]) -> list[str]:
    lines = ["| target | measured | met |", "|---|---|---|"]

    def add(name: str, measured: str, met: bool) -> None:
        lines.append(f"| {name} | {measured} | {'yes' if met else 'no'} |")

    for n, row in _rows(results, "sweep at 20 tok/s per stream"):
        if n <= 16:
            d50 = row["stack"]["ttft_ms"]["p50"] - row["bare"]["ttft_ms"]["p50"]
            d99 = row["stack"]["ttft_ms"]["p99"] - row["bare"]["ttft_ms"]["p99"]
            add(
                f"TTFT added vs (b) at {n} streams: ≤ 2 ms p50, ≤ 10 ms p99",
                f"{d50:+.1f} / {d99:+.1f} ms",
                d50 <= 2 and d99 <= 10,
            )
        if n == 1000:
            errors = row["stack"]["errors"]
            add("1,000 streams × 20 tokens/s with no errors", f"{errors} errors", errors == 0)
    for _n, row in _rows(results, "128 streams at 50 tok/s"):
        d50 = row["stack"]["itl_ms"]["p50"] - row["bare"]["itl_ms"]["p50"]
        d99 = row["stack"]["itl_ms"]["p99"] - row["bare"]["itl_ms"]["p99"]
        add(
            "ITL added vs (b) at 128 streams × 50 tokens/s: ≤ 2 ms p50, ≤ 20 ms p99",
            f"{d50:+.1f} / {d99:+.1f} ms",
            d50 <= 2 and d99 <= 20,
        )
    for _n, row in _rows(results, "engine flat out"):
        s = row["stack"]
        add(
            "relays ≥ 20,000 tokens/s with the engine flat out",
            f"{s['output_tokens_per_second']:.0f} tokens/s",
            s["output_tokens_per_second"] >= 20000,
        )
        add(
            "gateway CPU ≤ 50 µs per relayed token",
            f"{s.get('gateway_us_per_token')} µs",
            (s.get("gateway_us_per_token") or 1e9) <= 50,
        )
        add(
            "Redis under a third of a core",
            f"{s.get('redis_cores')} cores",
            (s.get("redis_cores") or 9) < 1 / 3,
        )
    return lines


def write_markdown(meta: dict[str, Any], results: dict[str, Any], path: Path) -> None:
    scenarios = list(dict.fromkeys(key.split(" | ")[0] for key in results))
    lines = [
        "# Benchmarks: the relay alone",
        "",
        "Generated by `make bench` (bench/relay.py); do not edit by hand.",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']} (shared and noisy: compare rows of one run, not across runs)",
        f"- command: `{meta['command']}`",
        f"- each figure is the median of {meta['repeats']} runs of {meta['seconds_per_run']} s, closed loop",
        "- engine: the benchmark engine (`WORKER_ENGINE=bench`), which emits `t1 t2 ...` at a set pace;"
        " the load generator, gateway, Redis, worker and bare server all share the same cores",
        "",
        "![relay cost](relay.png)",
        "",
        "## Targets",
        "",
        *_targets(results),
        "",
    ]
    for scenario in scenarios:
        rows = _rows(results, scenario)
        lines += [f"## {scenario}", "", *_table(rows), "", "Ratios:", "", *_ratios(rows), ""]
    path.write_text("\n".join(lines) + "\n")
