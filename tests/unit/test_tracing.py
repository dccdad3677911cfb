"""common/tracing.py: on/off from the OTEL_* variables, extracting a caller's context, the carrier a job
takes, and the spans it makes (exported through the SDK's in-memory exporter here; tests/integration/
test_tracing.py exports over OTLP to a real receiver)."""

import subprocess
import sys

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from common import tracing
from common.tracing import CallSpan, Tracing
from gateway.metrics import CallRecorder

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def exported() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider.get_tracer("test"), provider), exporter


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:1"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_on_only_with_an_endpoint(environ: dict[str, str], on: bool) -> None:
    tracer = Tracing.from_env("chat-test", environ)
    try:
        assert tracer.enabled is on
        assert (tracer is tracing.OFF) is not on
    finally:
        tracer.shutdown()


def test_traces_endpoint_wins_over_the_generic_one() -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://generic:4317",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4317",
    }
    tracer = Tracing.from_env("chat-test", environ)
    try:
        assert tracer.endpoint == "http://traces:4317"
    finally:
        tracer.shutdown()


def test_off_loads_no_sdk_and_starts_no_exporter() -> None:
    """Off costs nothing: the trace SDK is not even imported, no export thread runs, spans are no-ops."""
    code = (
        "import sys, threading\n"
        "from common.tracing import Tracing\n"
        "import gateway.relay, worker.consumer\n"
        "t = Tracing.from_env('x', {})\n"
        "span = t.call('ChatCompletion', 'm', 'grpc', [('traceparent', '" + TRACEPARENT + "')])\n"
        "assert not t.enabled and span.carrier() == {} and span.trace_id == ''\n"
        "assert span is t.call('ChatCompletion', 'n', 'http', [])\n"
        # (redis-py imports parts of the SDK for its own metrics; the trace SDK and exporters are ours.)
        "ours = ('opentelemetry.sdk.trace', 'opentelemetry.exporter')\n"
        "sdk = sorted(m for m in sys.modules if m.startswith(ours))\n"
        "assert not sdk, sdk\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "metadata",
    [
        [("authorization", "Bearer k"), ("traceparent", TRACEPARENT)],  # gRPC metadata: lower case
        [("Traceparent", TRACEPARENT), ("tracestate", "vendor=1")],  # HTTP header names, any case
    ],
)
def test_extract_finds_the_callers_context(metadata: list[tuple[str, str]]) -> None:
    from opentelemetry import trace

    context = trace.get_current_span(tracing.extract(metadata)).get_span_context()
    assert format(context.trace_id, "032x") == TRACE_ID
    assert format(context.span_id, "016x") == PARENT_ID
    assert context.is_remote


@pytest.mark.parametrize(
    "metadata",
    [[], [("traceparent", "not-a-traceparent")], [("traceparent-bin", b"\x00\x01")], [("x", "y")]],
)
def test_extract_ignores_what_is_not_a_trace_context(metadata: list[tuple[str, object]]) -> None:
    from opentelemetry import trace

    assert not trace.get_current_span(tracing.extract(metadata)).get_span_context().is_valid


def test_trace_headers_picks_the_w3c_headers_only() -> None:
    from multidict import CIMultiDict

    headers = CIMultiDict({"Authorization": "Bearer k", "TraceParent": TRACEPARENT, "tracestate": "a=1"})
    assert tracing.trace_headers(headers) == (("traceparent", TRACEPARENT), ("tracestate", "a=1"))
    assert tracing.trace_headers(CIMultiDict({"Authorization": "Bearer k"})) == ()


def test_call_span_is_a_child_of_the_caller_and_carries_the_genai_attributes(
    exported: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracer, exporter = exported
    span = tracer.call("StreamChatCompletion", "m", "http", [("traceparent", TRACEPARENT)])
    assert span.trace_id == TRACE_ID
    carrier = span.carrier()
    assert carrier["traceparent"].split("-")[1] == TRACE_ID  # the job continues the caller's trace
    span.caller("team-a")
    span.accepted("r1")
    span.first_token(0.25)
    span.finished("length", 12, 5, 0.125)
    span.end("OK")
    (done,) = exporter.get_finished_spans()
    assert done.name == "chat m"
    assert done.kind == SpanKind.SERVER
    assert done.parent is not None and format(done.parent.span_id, "016x") == PARENT_ID
    assert carrier["traceparent"].split("-")[2] == format(done.context.span_id, "016x")
    assert dict(done.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "m",
        "rpc.method": "StreamChatCompletion",
        "chat.transport": "http",
        "chat.api_key.name": "team-a",
        "chat.request_id": "r1",
        "gen_ai.response.id": "chatcmpl-r1",
        "chat.time_to_first_token_seconds": 0.25,
        "gen_ai.response.finish_reasons": ("length",),
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 5,
        "chat.queue_wait_seconds": 0.125,
        "rpc.grpc.status_code": "OK",
    }


def test_call_span_without_a_caller_context_is_a_root(exported: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracer, exporter = exported
    span = tracer.call("ChatCompletion", "m", "grpc", [("traceparent", "garbage")])
    span.end("DEADLINE_EXCEEDED")
    (done,) = exporter.get_finished_spans()
    assert done.parent is None
    assert done.status.status_code == StatusCode.ERROR


def test_attempt_span_is_a_child_of_the_call_span_and_links_to_it(
    exported: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracer, exporter = exported
    call = tracer.call("ChatCompletion", "m", "grpc", [])
    job_context = call.carrier()
    first = tracer.attempt(job_context, "r1", "m", 1, "worker-0")
    second = tracer.attempt(job_context, "r1", "m", 2, "worker-1")  # a continuation after a worker death
    engine_context = second.carrier()
    second.continued(7)
    first.end("handed_back", 7)
    second.end("finished", 3)
    call.end("OK")
    a1, a2, c = exporter.get_finished_spans()
    for attempt, number in ((a1, 1), (a2, 2)):
        assert attempt.kind == SpanKind.CONSUMER
        assert attempt.context.trace_id == c.context.trace_id
        assert attempt.parent is not None and attempt.parent.span_id == c.context.span_id
        assert [link.context.span_id for link in attempt.links] == [c.context.span_id]
        assert (attempt.attributes or {})["chat.attempt"] == number
    assert (a2.attributes or {})["chat.continued_tokens"] == 7
    assert engine_context["traceparent"].split("-")[2] == format(a2.context.span_id, "016x")


def test_attempt_of_an_untraced_job_is_a_root(exported: tuple[Tracing, InMemorySpanExporter]) -> None:
    tracer, exporter = exported
    tracer.attempt({}, "r1", "m", 1, "worker-0").end("failed", 0)
    (done,) = exporter.get_finished_spans()
    assert done.parent is None and not done.links
    assert done.status.status_code == StatusCode.ERROR


def test_recorder_puts_the_trace_id_on_ttft_and_duration_as_exemplars(
    exported: tuple[Tracing, InMemorySpanExporter],
) -> None:
    from gateway import metrics

    tracer, _ = exported
    span = tracer.call("ChatCompletion", "exemplar-model", "grpc", [("traceparent", TRACEPARENT)])
    recorder = CallRecorder("ChatCompletion", "exemplar-model", "grpc", span)
    recorder.delta()
    recorder.finished(3, 1, 0.01, "stop")
    recorder.done("OK")
    exemplars = [
        sample.exemplar
        for family in (metrics.TIME_TO_FIRST_TOKEN, metrics.REQUEST_DURATION)
        for metric in family.collect()
        for sample in metric.samples
        if sample.labels.get("model") == "exemplar-model" and sample.exemplar is not None
    ]
    assert len(exemplars) == 2
    assert {e.labels["trace_id"] for e in exemplars} == {TRACE_ID}


def test_recorder_of_an_untraced_call_has_no_exemplar() -> None:
    recorder = CallRecorder("ChatCompletion", "untraced-model", "grpc", CallSpan())
    recorder.delta()
    recorder.done("OK")
    from gateway import metrics

    samples = [
        s
        for m in metrics.TIME_TO_FIRST_TOKEN.collect()
        for s in m.samples
        if s.labels.get("model") == "untraced-model"
    ]
    assert samples and all(s.exemplar is None for s in samples)
