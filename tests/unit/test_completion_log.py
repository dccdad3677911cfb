"""How a completion's log tells a reader the call's end (gateway/completion_log.py): same status."""

import pytest
from google.rpc import code_pb2

from common import keys
from gateway.completion_log import END_CODE_FIELD, END_MESSAGE_FIELD, CallRecord, parse_entry
from gateway.errors import ServiceError


@pytest.mark.parametrize(
    ("code", "http", "error_code"),
    [
        (code_pb2.CANCELLED, 499, "cancelled"),  # a dropped stream nobody resumed: not a 500
        (code_pb2.DEADLINE_EXCEEDED, 504, "timeout"),
        (code_pb2.UNAVAILABLE, 503, "service_unavailable"),
        (code_pb2.ABORTED, 409, "stream_aborted"),
        (code_pb2.INTERNAL, 500, "internal_error"),
    ],
)
def test_an_end_entry_gives_the_reader_the_status_the_call_ended_with(
    code: int, http: int, error_code: str
) -> None:
    fields = {END_CODE_FIELD: str(code).encode(), END_MESSAGE_FIELD: b"why"}
    error = parse_entry("r", fields)
    assert isinstance(error, ServiceError)
    status = error.status
    assert (error.code, status.http, status.code, error.message) == (code, http, error_code, "why")


def test_the_call_record_entry_is_no_event() -> None:
    assert parse_entry("r", {b"call": b"{}"}) is None


def test_an_undecodable_event_ends_the_read_as_an_internal_error() -> None:
    error = parse_entry("r", {keys.PAYLOAD_FIELD: b"\xff\xff not protobuf"})
    assert isinstance(error, ServiceError) and error.code == code_pb2.INTERNAL


def test_call_records_of_older_and_newer_gateways_both_read() -> None:
    older = b'{"request_id": "r", "owner": "o", "model": "m", "created": 1, "deadline": 2.0}'
    assert CallRecord.from_json(older) == CallRecord("r", "o", "m", 1, 2.0, choices=1)
    newer = older.removesuffix(b"}") + b', "choices": 3, "added_later": 1}'
    assert CallRecord.from_json(newer).choices == 3
    # A record of one choice is written as older gateways wrote it, so that they read it too.
    assert CallRecord.from_json(CallRecord("r", "o", "m", 1, 2.0).to_json()) == CallRecord(
        "r", "o", "m", 1, 2.0
    )
    assert b"choices" not in CallRecord("r", "o", "m", 1, 2.0).to_json()
    assert CallRecord.from_json(CallRecord("r", "o", "m", 1, 2.0, 4).to_json()).choices == 4
