"""chat_client's keyword arguments become a chat.v1 request (chat_client/request.py)."""

from chat_client.request import build_request

HI = [{"role": "user", "content": "hi"}]


def test_penalties_are_sent_and_none_leaves_them_unset() -> None:
    request = build_request(model="m", messages=HI, frequency_penalty=0.5, presence_penalty=-1.0)
    assert (request.frequency_penalty, request.presence_penalty) == (0.5, -1.0)
    request = build_request(model="m", messages=HI, frequency_penalty=0.0, presence_penalty=None)
    assert request.HasField("frequency_penalty") and not request.HasField("presence_penalty")


def test_logprobs_and_n_are_sent_and_none_leaves_them_unset() -> None:
    request = build_request(model="m", messages=HI, logprobs=True, top_logprobs=0, n=3, temperature=0.0)
    assert (request.logprobs, request.top_logprobs, request.n, request.temperature) == (True, 0, 3, 0.0)
    assert request.HasField("top_logprobs") and request.HasField("temperature")
    plain = build_request(model="m", messages=HI, logprobs=None, n=None)
    assert not any(plain.HasField(f) for f in ("logprobs", "top_logprobs", "n", "temperature", "seed"))
