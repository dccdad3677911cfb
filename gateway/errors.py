"""The gateway's errors and the one table that gives each its gRPC status and HTTP status.

ServiceError                     any error the caller is told about
├── InvalidField                 INVALID_ARGUMENT, BadRequest field violation
│   └── UnsupportedParameter     a parameter of the dialect this service does not implement
├── MalformedRequest             INVALID_ARGUMENT: the request bytes are not a valid message
├── ModelNotFound                NOT_FOUND, BadRequest field violation on `model`
├── CompletionNotFound           NOT_FOUND: a completion id unknown, expired, or another key's
├── JsonValidateFailed           INVALID_ARGUMENT, ErrorInfo reason json_validate_failed
│   └── ToolUseFailed            ... reason tool_use_failed: the model's tool calls did not parse
├── JobFailed                    status chosen by the worker's failure kind
├── Unavailable                  UNAVAILABLE (Redis or workers out of reach)
├── Unauthenticated              UNAUTHENTICATED: no API key, or an unknown one
├── PermissionDenied             PERMISSION_DENIED: revoked key, or a model the key may not use
├── Aborted                      ABORTED (worker lost after text was sent, and the job could not continue)
├── IdempotencyConflict          ALREADY_EXISTS: an idempotency key reused with another request
├── RequestTooLarge              RESOURCE_EXHAUSTED without RetryInfo: larger than the hard limit
├── DeadlineExceeded             DEADLINE_EXCEEDED
└── Overloaded                   RESOURCE_EXHAUSTED with RetryInfo
    ├── QueueFull                too many jobs waiting for the model: queue position, estimated wait
    │   └── FlexCapacityExceeded the model's flex lane is full (service_tier "flex"): HTTP 498
    ├── TooManyCalls             too many calls open on this gateway
    ├── RateLimited              the API key's requests or tokens per minute are used up
    └── RedisOutOfMemory         Redis reached its maxmemory (noeviction): it takes no new jobs

`STATUSES` below is the only place that says which status each error gets, on gRPC and on
HTTP (with the `type` and `code` of the Groq/OpenAI error body, which the SDKs map to their
typed exceptions).
"""

import logging
import uuid
from dataclasses import dataclass

from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from common import codec

log = logging.getLogger(__name__)

ERROR_DOMAIN = "chat.v1"


@dataclass(frozen=True)
class Status:
    """How one kind of error reaches a caller: gRPC code; HTTP status, error type and code."""

    grpc: int
    http: int
    type: str
    code: str | None = None
    retryable: bool = False  # the same request may succeed later (overload, an outage)


class ServiceError(Exception):
    code: int = code_pb2.INTERNAL  # set from STATUSES
    status = Status(code_pb2.INTERNAL, 500, "api_error", "internal_error")  # set from STATUSES

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        # Extra trailing metadata for the caller (e.g. the x-ratelimit-* budget).
        self.metadata: tuple[tuple[str, str], ...] = ()

    def details(self) -> list[any_pb2.Any]:
        return []

    def to_status(self) -> status_pb2.Status:
        return status_pb2.Status(code=self.code, message=self.message, details=self.details())


class InvalidField(ServiceError):
    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"`{field}` {rule}")
        self.field = field
        self.rule = rule

    def details(self) -> list[any_pb2.Any]:
        violation = error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.message)
        return [_pack(error_details_pb2.BadRequest(field_violations=[violation]))]


class UnsupportedParameter(InvalidField):
    def __init__(self, field: str, rule: str = "is not supported by this service") -> None:
        super().__init__(field, rule)


class MalformedRequest(ServiceError):
    pass


class RequestTooLarge(ServiceError):
    pass


# How much of a refused value an error message repeats.
_SHOWN_CHARS = 40


def shown(value: str) -> str:
    """repr() of a caller's value for an error message, cut short: errors must stay small too."""
    if len(value) <= _SHOWN_CHARS:
        return repr(value)
    return f"{value[:_SHOWN_CHARS]!r}... ({len(value)} characters)"


class ModelNotFound(InvalidField):
    def __init__(self, model: str, known: list[str]) -> None:
        super().__init__(
            "model", f"names no model served here: {shown(model)} (available: {', '.join(known)})"
        )


class CompletionNotFound(ServiceError):
    def __init__(self, request_id: str) -> None:
        super().__init__(
            f"no completion with id 'chatcmpl-{request_id}': unknown, past its retention window,"
            " or created with another API key"
        )


class JsonValidateFailed(ServiceError):
    reason = "json_validate_failed"

    def __init__(self, message: str, failed_generation: str) -> None:
        super().__init__(message)
        self.failed_generation = failed_generation

    def details(self) -> list[any_pb2.Any]:
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata={"failed_generation": self.failed_generation}
        )
        return [_pack(info)]


class Unavailable(ServiceError):
    @classmethod
    def hiding(cls, what: str, cause: BaseException, request_id: str = "") -> "Unavailable":
        """What failed and an id to quote, for the caller; the cause (a Redis error names the
        host and port of Redis) only in the log, under the same id.

        request_id: the call's, where its job exists; otherwise a new one that marks this failure.
        """
        request_id = request_id or uuid.uuid4().hex
        log.warning("%s (request %s): %s: %s", what, request_id, type(cause).__name__, cause)
        return cls(f"{what}; retry the request (request id {request_id})")


class DeadlineExceeded(ServiceError):
    pass


class Unauthenticated(ServiceError):
    pass


class PermissionDenied(ServiceError):
    pass


class Aborted(ServiceError):
    pass


class IdempotencyConflict(ServiceError):
    def __init__(self, key: str) -> None:
        super().__init__(
            # In full (at most 255 printable characters, checked before): the caller must recognise it.
            f"idempotency key {key!r} was already used with a different request; send a new"
            " key for a new request, or the same request to get its answer"
        )


class Overloaded(ServiceError):
    retry_after_seconds = 1.0  # GATEWAY_RETRY_AFTER_SECONDS, set at start-up

    def details(self) -> list[any_pb2.Any]:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(self.retry_after_seconds * 1e9))
        return [_pack(error_details_pb2.RetryInfo(retry_delay=delay))]


class QueueFull(Overloaded):
    """The model's queue holds its limit of jobs: the caller learns where it would stand in line
    and, once the gateway can estimate it (gateway/wait_estimate.py), how long that would take.

    gRPC: RetryInfo (the estimated wait, at least GATEWAY_RETRY_AFTER_SECONDS, at most
    MAX_RETRY_AFTER_SECONDS) and ErrorInfo with `queue_position` and `estimated_wait_seconds`;
    both transports: x-queue-position and x-estimated-wait-seconds (trailing metadata, headers).
    """

    reason = "queue_full"
    MAX_RETRY_AFTER_SECONDS = 60.0

    def __init__(self, model: str, waiting: int, wait_seconds: float | None = None, what: str = "") -> None:
        position = waiting + 1
        estimate = "" if wait_seconds is None else f", estimated wait {wait_seconds:.0f}s"
        super().__init__(
            what
            or f"the queue for model {model!r} is full ({waiting} jobs waiting; this request would be"
            f" #{position} in line{estimate}); retry later"
        )
        self.queue_position = position
        self.wait_seconds = wait_seconds
        if wait_seconds is not None:
            floor = self.retry_after_seconds  # GATEWAY_RETRY_AFTER_SECONDS
            self.retry_after_seconds = min(max(wait_seconds, floor), max(floor, self.MAX_RETRY_AFTER_SECONDS))
        self.metadata = (("x-queue-position", str(position)),)
        if wait_seconds is not None:
            self.metadata += (("x-estimated-wait-seconds", f"{wait_seconds:.1f}"),)

    def details(self) -> list[any_pb2.Any]:
        metadata = {"queue_position": str(self.queue_position)}
        if self.wait_seconds is not None:
            metadata["estimated_wait_seconds"] = f"{self.wait_seconds:.1f}"
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN, metadata=metadata)
        return [*super().details(), _pack(info)]


class FlexCapacityExceeded(QueueFull):
    """Groq's flex tier: refused at once when its lane is full, HTTP 498 capacity_exceeded."""

    reason = "capacity_exceeded"

    def __init__(self, model: str, waiting: int, wait_seconds: float | None = None) -> None:
        estimate = "" if wait_seconds is None else f", estimated wait {wait_seconds:.0f}s"
        super().__init__(
            model,
            waiting,
            wait_seconds,
            f"flex capacity for model {model!r} is exceeded ({waiting} flex jobs waiting; this request"
            f" would be #{waiting + 1} in the flex lane{estimate}); retry later, or send the request"
            " on demand",
        )


class TooManyCalls(Overloaded):
    def __init__(self, limit: int) -> None:
        super().__init__(f"this gateway already serves {limit} calls; retry later")


class RateLimited(Overloaded):
    def __init__(
        self, message: str, retry_after_seconds: float, metadata: tuple[tuple[str, str], ...]
    ) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds
        self.metadata = metadata


class RedisOutOfMemory(Overloaded):
    def __init__(self, what: str) -> None:
        super().__init__(f"{what}: Redis is out of memory (maxmemory reached); retry later")


class ToolUseFailed(JsonValidateFailed):
    """The reply had to call tools and what the model generated is not valid calls (Groq's 400)."""

    reason = "tool_use_failed"


class JobFailed(ServiceError):
    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = status.grpc


_OVERLOADED = Status(code_pb2.RESOURCE_EXHAUSTED, 503, "api_error", "service_overloaded", retryable=True)
# The one table. Overloaded errors also send a retry delay (RetryInfo on gRPC, retry-after on HTTP).
STATUSES: dict[type[ServiceError], Status] = {
    ServiceError: Status(code_pb2.INTERNAL, 500, "api_error", "internal_error"),
    InvalidField: Status(code_pb2.INVALID_ARGUMENT, 400, "invalid_request_error"),
    UnsupportedParameter: Status(
        code_pb2.INVALID_ARGUMENT, 400, "invalid_request_error", "unsupported_parameter"
    ),
    MalformedRequest: Status(code_pb2.INVALID_ARGUMENT, 400, "invalid_request_error", "invalid_json"),
    ModelNotFound: Status(code_pb2.NOT_FOUND, 404, "invalid_request_error", "model_not_found"),
    CompletionNotFound: Status(code_pb2.NOT_FOUND, 404, "invalid_request_error", "completion_not_found"),
    JsonValidateFailed: Status(
        code_pb2.INVALID_ARGUMENT, 400, "invalid_request_error", "json_validate_failed"
    ),
    ToolUseFailed: Status(code_pb2.INVALID_ARGUMENT, 400, "invalid_request_error", "tool_use_failed"),
    Unauthenticated: Status(code_pb2.UNAUTHENTICATED, 401, "invalid_request_error", "invalid_api_key"),
    PermissionDenied: Status(code_pb2.PERMISSION_DENIED, 403, "permission_error", "permission_denied"),
    RequestTooLarge: Status(code_pb2.RESOURCE_EXHAUSTED, 413, "invalid_request_error", "request_too_large"),
    Overloaded: _OVERLOADED,
    QueueFull: _OVERLOADED,
    FlexCapacityExceeded: Status(
        code_pb2.RESOURCE_EXHAUSTED, 498, "api_error", FlexCapacityExceeded.reason, retryable=True
    ),
    TooManyCalls: _OVERLOADED,
    RateLimited: Status(
        code_pb2.RESOURCE_EXHAUSTED, 429, "rate_limit_exceeded", "rate_limit_exceeded", retryable=True
    ),
    RedisOutOfMemory: _OVERLOADED,
    Aborted: Status(code_pb2.ABORTED, 409, "api_error", "stream_aborted"),
    IdempotencyConflict: Status(
        code_pb2.ALREADY_EXISTS, 409, "invalid_request_error", "idempotency_key_reused"
    ),
    DeadlineExceeded: Status(code_pb2.DEADLINE_EXCEEDED, 504, "api_error", "timeout"),
    Unavailable: Status(code_pb2.UNAVAILABLE, 503, "api_error", "service_unavailable", retryable=True),
}
# Jobs that end with a Failed event, by the worker's failure kind.
JOB_FAILURES: dict[int, Status] = {
    codec.FailureKind.FAILURE_KIND_INTERNAL: STATUSES[ServiceError],
    codec.FailureKind.FAILURE_KIND_DEADLINE_EXCEEDED: STATUSES[DeadlineExceeded],
    codec.FailureKind.FAILURE_KIND_CANCELLED: Status(code_pb2.CANCELLED, 499, "api_error", "cancelled"),
    codec.FailureKind.FAILURE_KIND_UNAVAILABLE: STATUSES[Unavailable],
    codec.FailureKind.FAILURE_KIND_BAD_PAYLOAD: STATUSES[ServiceError],
    codec.FailureKind.FAILURE_KIND_INVALID_REQUEST: STATUSES[InvalidField],
}
for _kind, _status in STATUSES.items():
    _kind.status, _kind.code = _status, _status.grpc


def from_failed_event(failed: codec.Failed) -> ServiceError:
    """The error a caller sees for a job that ended with a Failed event."""
    if failed.reason == JsonValidateFailed.reason:
        return JsonValidateFailed(failed.message, failed.failed_generation)
    if failed.reason == ToolUseFailed.reason:
        return ToolUseFailed(failed.message, failed.failed_generation)
    if failed.kind == codec.FailureKind.FAILURE_KIND_INVALID_REQUEST and failed.field:
        return InvalidField(failed.field, failed.message)
    status = JOB_FAILURES.get(failed.kind, STATUSES[ServiceError])
    return JobFailed(status, failed.message or "the job failed")


def _pack(
    message: error_details_pb2.BadRequest | error_details_pb2.ErrorInfo | error_details_pb2.RetryInfo,
) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
