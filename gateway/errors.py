"""The gateway's errors and the one table that turns them into gRPC statuses.

ServiceError                     any error the caller is told about
├── InvalidField                 INVALID_ARGUMENT, BadRequest field violation
├── MalformedRequest             INVALID_ARGUMENT: the request bytes are not a valid message
├── ModelNotFound                NOT_FOUND, BadRequest field violation on `model`
├── JsonValidateFailed           INVALID_ARGUMENT, ErrorInfo reason json_validate_failed
├── JobFailed                    status chosen by the worker's failure kind
├── Unavailable                  UNAVAILABLE (Redis or workers out of reach)
├── Unauthenticated              UNAUTHENTICATED: no API key, or an unknown one
├── PermissionDenied             PERMISSION_DENIED: revoked key, or a model the key may not use
├── Aborted                      ABORTED (the job's worker was lost after tokens were sent)
├── DeadlineExceeded             DEADLINE_EXCEEDED
└── Overloaded                   RESOURCE_EXHAUSTED with RetryInfo
    ├── QueueFull                too many jobs waiting for the model
    ├── TooManyCalls             too many calls open on this gateway
    └── RateLimited              the API key's requests or tokens per minute are used up
"""

from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from common import codec

ERROR_DOMAIN = "chat.v1"


class ServiceError(Exception):
    code: int = code_pb2.INTERNAL

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
    code = code_pb2.INVALID_ARGUMENT

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"`{field}` {rule}")
        self.field = field
        self.rule = rule

    def details(self) -> list[any_pb2.Any]:
        violation = error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.message)
        return [_pack(error_details_pb2.BadRequest(field_violations=[violation]))]


class MalformedRequest(ServiceError):
    code = code_pb2.INVALID_ARGUMENT


class ModelNotFound(InvalidField):
    code = code_pb2.NOT_FOUND

    def __init__(self, model: str, known: list[str]) -> None:
        super().__init__("model", f"names no model served here: {model!r} (available: {', '.join(known)})")


class JsonValidateFailed(ServiceError):
    code = code_pb2.INVALID_ARGUMENT
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
    code = code_pb2.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = code_pb2.DEADLINE_EXCEEDED


class Unauthenticated(ServiceError):
    code = code_pb2.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = code_pb2.PERMISSION_DENIED


class Aborted(ServiceError):
    code = code_pb2.ABORTED


class Overloaded(ServiceError):
    code = code_pb2.RESOURCE_EXHAUSTED
    retry_after_seconds = 1.0  # GATEWAY_RETRY_AFTER_SECONDS, set at start-up

    def details(self) -> list[any_pb2.Any]:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(self.retry_after_seconds * 1e9))
        return [_pack(error_details_pb2.RetryInfo(retry_delay=delay))]


class QueueFull(Overloaded):
    def __init__(self, model: str, waiting: int) -> None:
        super().__init__(f"the queue for model {model!r} is full ({waiting} jobs waiting); retry later")


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


class JobFailed(ServiceError):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


_FAILURE_CODES = {
    codec.FailureKind.FAILURE_KIND_INTERNAL: code_pb2.INTERNAL,
    codec.FailureKind.FAILURE_KIND_DEADLINE_EXCEEDED: code_pb2.DEADLINE_EXCEEDED,
    codec.FailureKind.FAILURE_KIND_CANCELLED: code_pb2.CANCELLED,
    codec.FailureKind.FAILURE_KIND_UNAVAILABLE: code_pb2.UNAVAILABLE,
    codec.FailureKind.FAILURE_KIND_BAD_PAYLOAD: code_pb2.INTERNAL,
}


def from_failed_event(failed: codec.Failed) -> ServiceError:
    """The error a caller sees for a job that ended with a Failed event."""
    if failed.reason == JsonValidateFailed.reason:
        return JsonValidateFailed(failed.message, failed.failed_generation)
    code = _FAILURE_CODES.get(failed.kind, code_pb2.INTERNAL)
    return JobFailed(code, failed.message or "the job failed")


def _pack(
    message: error_details_pb2.BadRequest | error_details_pb2.ErrorInfo | error_details_pb2.RetryInfo,
) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
