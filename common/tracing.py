"""OpenTelemetry traces: the only module that imports OpenTelemetry; names every span and attribute.

One call is one trace. The gateway opens a server span per call (`Tracing.call`), a child of the
caller's W3C `traceparent` when it sent one; its context travels inside the job
(`CallSpan.carrier()` -> Job.trace_context), and each worker attempt at the job opens a consumer
span under it (`Tracing.attempt`), whose own context goes to the engine (vLLM's `llm_request`
span). A continuation after a worker death is another attempt span of the same trace.

Off unless an OTLP endpoint is set (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
OTEL_EXPORTER_OTLP_ENDPOINT): then nothing of the SDK is imported, no exporter runs, and each span
method is one attribute check. On, spans go through the SDK's BatchSpanProcessor (spans are
queued and exported from a background thread; nothing is done per token) to the OTLP exporter,
which reads the other standard variables itself (OTEL_EXPORTER_OTLP_*_HEADERS, _INSECURE, ...);
OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES name the process, OTEL_TRACES_SAMPLER samples.

The tracer provider is the process's own, not OpenTelemetry's global one: vLLM installs its own
global provider in the worker, and the two must not fight over it.
"""

import logging
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

# The W3C Trace Context headers (and gRPC metadata keys) a call's context arrives in.
TRACE_HEADERS = ("traceparent", "tracestate")
_PROPAGATOR = TraceContextTextMapPropagator()

# Attribute names: the OpenTelemetry GenAI conventions where they have one, chat.* for ours.
OPERATION = "gen_ai.operation.name"
REQUEST_MODEL = "gen_ai.request.model"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
FINISH_REASONS = "gen_ai.response.finish_reasons"
RESPONSE_ID = "gen_ai.response.id"
REQUEST_ID = "chat.request_id"
API_KEY_NAME = "chat.api_key.name"  # the key's name, never the key
RPC = "rpc.method"
TRANSPORT = "chat.transport"
STATUS_CODE = "rpc.grpc.status_code"  # the name, e.g. "DEADLINE_EXCEEDED" (HTTP calls too)
QUEUE_WAIT = "chat.queue_wait_seconds"
TIME_TO_FIRST_TOKEN = "chat.time_to_first_token_seconds"
ATTEMPT = "chat.attempt"
WORKER_ID = "chat.worker_id"
OUTCOME = "chat.outcome"
CONTINUED_TOKENS = "chat.continued_tokens"


def _endpoint(environ: Mapping[str, str]) -> str:
    """The OTLP endpoint traces go to, as the OTLP/gRPC exporter reads it; "" when none is set."""
    return environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")


def _protocol(environ: Mapping[str, str]) -> str:
    return (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    )


def _wanted(environ: Mapping[str, str]) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(_endpoint(environ))


class CallSpan:
    """The gateway's span of one call. Every method does nothing on a call that is not traced."""

    def __init__(self, span: Span | None = None) -> None:
        self._span = span
        self.trace_id = ""  # 32 hex digits while traced and sampled: the metrics' exemplar
        if span is not None and span.get_span_context().trace_flags.sampled:
            self.trace_id = trace.format_trace_id(span.get_span_context().trace_id)

    def carrier(self) -> dict[str, str]:
        """The call's trace context as W3C headers, for the job; empty when not traced."""
        return _inject(self._span)

    def caller(self, api_key_name: str) -> None:
        if self._span is not None:
            self._span.set_attribute(API_KEY_NAME, api_key_name)

    def accepted(self, request_id: str) -> None:
        if self._span is not None:
            self._span.set_attributes({REQUEST_ID: request_id, RESPONSE_ID: f"chatcmpl-{request_id}"})

    def first_token(self, seconds: float) -> None:
        if self._span is not None:
            self._span.set_attribute(TIME_TO_FIRST_TOKEN, seconds)

    def finished(self, finish_reason: str, input_tokens: int, output_tokens: int, queue_wait: float) -> None:
        if self._span is not None:
            self._span.set_attributes(
                {
                    FINISH_REASONS: [finish_reason] if finish_reason else [],
                    INPUT_TOKENS: input_tokens,
                    OUTPUT_TOKENS: output_tokens,
                    QUEUE_WAIT: queue_wait,
                }
            )

    def end(self, code: str) -> None:
        """Ends the span with the call's final status code name ("OK", "CANCELLED", ...)."""
        if self._span is None:
            return
        self._span.set_attribute(STATUS_CODE, code)
        if code != "OK":
            self._span.set_status(Status(StatusCode.ERROR, code))
        self._span.end()


class AttemptSpan:
    """A worker's span of one attempt at a job. Every method does nothing when not traced."""

    def __init__(self, span: Span | None = None) -> None:
        self._span = span

    def carrier(self) -> dict[str, str]:
        """This attempt's context as W3C headers, for the engine (vLLM's trace_headers)."""
        return _inject(self._span)

    def continued(self, num_tokens: int) -> None:
        if self._span is not None:
            self._span.set_attribute(CONTINUED_TOKENS, num_tokens)

    def end(self, outcome: str, output_tokens: int) -> None:
        """Ends the span with how the attempt ended (worker/metrics.py JOBS outcomes)."""
        if self._span is None:
            return
        self._span.set_attributes({OUTCOME: outcome, OUTPUT_TOKENS: output_tokens})
        if outcome not in ("finished", "handed_back"):
            self._span.set_status(Status(StatusCode.ERROR, outcome))
        self._span.end()


_UNTRACED_CALL = CallSpan()
_UNTRACED_ATTEMPT = AttemptSpan()


class Tracing:
    """The process's tracer, built once at start-up (`from_env`) and passed in; OFF when not traced."""

    def __init__(self, tracer: Tracer | None = None, provider: "TracerProvider | None" = None) -> None:
        self._tracer = tracer
        self._provider = provider
        self.endpoint = ""  # where spans go; vLLM exports its own there too (worker/engine/vllm.py)

    @classmethod
    def from_env(cls, service_name: str, environ: Mapping[str, str] = os.environ) -> "Tracing":
        """Exports over OTLP when an endpoint is set, else OFF; service_name unless OTEL_SERVICE_NAME."""
        if not _wanted(environ):
            return OFF
        # Imported only here: a process that does not trace loads none of the SDK.
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
        attributes = environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
        if not (environ.get("OTEL_SERVICE_NAME") or "service.name=" in attributes):
            resource = resource.merge(Resource({SERVICE_NAME: service_name}))
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(_exporter(_protocol(environ))))
        tracing = cls(provider.get_tracer("chat-service"), provider)
        tracing.endpoint = _endpoint(environ)
        log.info("tracing on: OTLP/%s to %s", _protocol(environ), tracing.endpoint)
        return tracing

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def call(self, rpc: str, model: str, transport: str, metadata: Iterable[tuple[str, Any]]) -> CallSpan:
        """Starts the server span of a call, a child of the caller's `traceparent` when it sent one."""
        if self._tracer is None:
            return _UNTRACED_CALL
        span = self._tracer.start_span(
            f"chat {model}" if model else "chat",
            context=extract(metadata),
            kind=SpanKind.SERVER,
            attributes={OPERATION: "chat", REQUEST_MODEL: model, RPC: rpc, TRANSPORT: transport},
        )
        return CallSpan(span)

    def attempt(
        self, trace_context: Mapping[str, str], request_id: str, model: str, attempt: int, worker_id: str
    ) -> AttemptSpan:
        """Starts a worker's span of one attempt at a job: a child of the gateway's call span.

        It also links to that span, so tools that show a consumer apart from its producer
        (messaging conventions) still find the call.
        """
        if self._tracer is None:
            return _UNTRACED_ATTEMPT
        parent = _PROPAGATOR.extract(dict(trace_context))
        parent_span = trace.get_current_span(parent).get_span_context()
        links = [Link(parent_span)] if parent_span.is_valid else []
        span = self._tracer.start_span(
            f"process {model}",
            context=parent,
            kind=SpanKind.CONSUMER,
            links=links,
            attributes={
                OPERATION: "chat",
                REQUEST_MODEL: model,
                REQUEST_ID: request_id,
                ATTEMPT: attempt,
                WORKER_ID: worker_id,
            },
        )
        return AttemptSpan(span)

    def shutdown(self) -> None:
        """Exports what is still queued; call once, when the process stops."""
        if self._provider is not None:
            self._provider.shutdown()


OFF = Tracing()


def extract(metadata: Iterable[tuple[str, Any]]) -> Context:
    """The caller's trace context from gRPC metadata or HTTP headers (name, value) pairs."""
    carrier = {k.lower(): v for k, v in metadata if isinstance(v, str) and k.lower() in TRACE_HEADERS}
    return _PROPAGATOR.extract(carrier)


def trace_headers(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The W3C trace headers among an HTTP request's (a case-insensitive mapping), as metadata pairs."""
    return tuple((name, value) for name in TRACE_HEADERS if (value := headers.get(name)))


def _inject(span: Span | None) -> dict[str, str]:
    carrier: dict[str, str] = {}
    if span is not None:
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def _exporter(protocol: str) -> Any:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL must be grpc or http/protobuf, got {protocol!r}")
