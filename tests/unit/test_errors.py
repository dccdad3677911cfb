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
    }
    for kind, code in expected.items():
        assert from_failed_event(codec.Failed(kind=kind, message="m")).code == code
