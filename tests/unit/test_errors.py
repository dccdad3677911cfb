"""Gateway errors carry the right status code and rich details (gateway/errors.py)."""

from google.rpc import code_pb2, error_details_pb2

from common import codec
from gateway.errors import InvalidField, JsonValidateFailed, ModelNotFound, from_failed_event


def test_invalid_field_names_field_and_rule_in_message_and_details() -> None:
    status = InvalidField("top_p", "must be in (0, 1], got 2").to_status()
    assert status.code == code_pb2.INVALID_ARGUMENT
    assert status.message == "`top_p` must be in (0, 1], got 2"
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == "top_p"


def test_unknown_model_is_not_found_on_field_model() -> None:
    status = ModelNotFound("gpt-x", ["a", "b"]).to_status()
    assert status.code == code_pb2.NOT_FOUND
    assert "gpt-x" in status.message and "a, b" in status.message


def test_failed_events_map_to_statuses() -> None:
    json_failure = codec.Failed(
        kind=codec.FailureKind.FAILURE_KIND_INVALID_OUTPUT,
        message="not JSON",
        reason="json_validate_failed",
        failed_generation='{"a": ',
    )
    error = from_failed_event(json_failure)
    assert isinstance(error, JsonValidateFailed)
    info = error_details_pb2.ErrorInfo()
    assert error.to_status().details[0].Unpack(info)
    assert info.reason == "json_validate_failed" and info.metadata["failed_generation"] == '{"a": '
    expected = {
        codec.FailureKind.FAILURE_KIND_DEADLINE_EXCEEDED: code_pb2.DEADLINE_EXCEEDED,
        codec.FailureKind.FAILURE_KIND_CANCELLED: code_pb2.CANCELLED,
        codec.FailureKind.FAILURE_KIND_UNAVAILABLE: code_pb2.UNAVAILABLE,
        codec.FailureKind.FAILURE_KIND_INTERNAL: code_pb2.INTERNAL,
        codec.FailureKind.FAILURE_KIND_UNSPECIFIED: code_pb2.INTERNAL,
        codec.FailureKind.FAILURE_KIND_INVALID_REQUEST: code_pb2.INVALID_ARGUMENT,  # no field: no violation
    }
    for kind, code in expected.items():
        assert from_failed_event(codec.Failed(kind=kind, message="m")).code == code


def test_a_request_the_worker_refuses_is_invalid_argument_on_its_field() -> None:
    failed = codec.Failed(
        kind=codec.FailureKind.FAILURE_KIND_INVALID_REQUEST,
        message="make a prompt of 5000 tokens, which leaves no room in the engine's context window",
        field="messages",
    )
    status = from_failed_event(failed).to_status()
    violations = error_details_pb2.BadRequest()
    assert status.code == code_pb2.INVALID_ARGUMENT and status.details[0].Unpack(violations)
    assert violations.field_violations[0].field == "messages"
    assert status.message.startswith("`messages` make a prompt of 5000 tokens")


def test_every_error_has_one_row_in_the_status_table() -> None:
    from gateway import errors

    kinds = {
        v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, errors.ServiceError)
    } - {errors.JobFailed}
    assert kinds == set(errors.STATUSES)
    assert errors.RateLimited("x", 1.0, ()).status.http == 429
    assert errors.ModelNotFound("x", []).status.code == "model_not_found"
    assert errors.QueueFull("m", 1).code == code_pb2.RESOURCE_EXHAUSTED
