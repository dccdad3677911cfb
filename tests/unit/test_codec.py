"""The queue wire format (common/codec.py)."""

import pytest

from common import codec


def test_job_round_trips() -> None:
    job = codec.Job(request_id="r1", model="m", prompt_token_ids=[1, 2, 3], reply_to="chat:replies:g")
    job.sampling.stop.append("x")
    assert codec.decode_job(codec.encode(job)) == job


def test_event_round_trips() -> None:
    event = codec.Event(request_id="r1", seq=4, delta=codec.Delta(text="hi", completion_tokens=2))
    assert codec.decode_event(codec.encode(event)) == event


@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"garbage that is not protobuf", b""])
def test_malformed_payloads_raise_bad_payload(payload: bytes) -> None:
    with pytest.raises(codec.BadPayload):
        codec.decode_job(payload)
    with pytest.raises(codec.BadPayload):
        codec.decode_event(payload)


def test_an_event_without_kind_is_refused() -> None:
    with pytest.raises(codec.BadPayload, match="kind"):
        codec.decode_event(codec.encode(codec.Event(request_id="r1", seq=0)))
