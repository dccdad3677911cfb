"""Errors raised by the client, mapped from gRPC statuses in one place.

APIError
├── APIConnectionError       UNAVAILABLE (service or its queue out of reach)
├── APITimeoutError          DEADLINE_EXCEEDED
└── APIStatusError           any other non-OK status
    ├── BadRequestError      INVALID_ARGUMENT (field, reason, failed_generation from the details)
    ├── NotFoundError        NOT_FOUND (unknown model)
    ├── RateLimitError       RESOURCE_EXHAUSTED (retry_after from RetryInfo)
    └── InternalServerError  INTERNAL and everything else
"""

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class APIError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field: str | None = None  # the request field a BadRequest violation names
        self.reason: str | None = None  # ErrorInfo.reason, e.g. "json_validate_failed"
        self.failed_generation: str | None = None
        self.retry_after: float | None = None  # seconds, from RetryInfo


class APIConnectionError(APIError):
    pass


class APITimeoutError(APIError):
    pass


class APIStatusError(APIError):
    pass


class BadRequestError(APIStatusError):
    pass


class NotFoundError(APIStatusError):
    pass


class RateLimitError(APIStatusError):
    pass


class InternalServerError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class PermissionDeniedError(APIStatusError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[APIError]] = {
    grpc.StatusCode.UNAVAILABLE: APIConnectionError,
    grpc.StatusCode.DEADLINE_EXCEEDED: APITimeoutError,
    grpc.StatusCode.INVALID_ARGUMENT: BadRequestError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


def from_rpc_error(error: grpc.RpcError) -> APIError:
    code: grpc.StatusCode = error.code()
    message: str = error.details() or ""
    result = _BY_CODE.get(code, InternalServerError)(code, message)
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            result.field = bad.field_violations[0].field if bad.field_violations else None
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            result.reason = info.reason
            result.failed_generation = info.metadata.get("failed_generation")
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            result.retry_after = retry.retry_delay.ToTimedelta().total_seconds()
    return result
