"""Streams resume by themselves after a dropped connection: every chunk once, from the right cursor.

Fake calls (scripted chunks, then a scripted error) stand in for gRPC calls to test the resume
logic of Stream and AsyncStream; a fake ChatService (real gRPC server in-process) checks what
the client sends to resume.
"""

from collections.abc import AsyncIterator, Iterator
from concurrent import futures

import grpc
import pytest
from google.rpc import status_pb2

from chat.v1 import chat_pb2, chat_pb2_grpc
from chat_client import APIConnectionError, APIError, Client
from chat_client import client as client_module
from chat_client.client import AsyncStream, Stream

COMPLETION_ID = "chatcmpl-0123456789abcdef0123456789abcdef"
DROPPED = (grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)")


class FakeRpcError(grpc.RpcError):
    """What a failed call raises: a status code and message; from the gateway, also its
    google.rpc.Status in the trailers (gRPC's own statuses for a broken connection have none)."""

    def __init__(self, code: grpc.StatusCode, details: str, from_gateway: bool = False) -> None:
        self._code, self._details, self._from_gateway = code, details, from_gateway

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        if not self._from_gateway:
            return ()
        status = status_pb2.Status(code=self._code.value[0], message=self._details)
        return (("grpc-status-details-bin", status.SerializeToString()),)


def chunk(sequence_number: int, content: str = "", finish_reason: str = "") -> chat_pb2.ChatCompletionChunk:
    delta = chat_pb2.Delta(role="assistant") if sequence_number == 0 else chat_pb2.Delta(content=content)
    choice = chat_pb2.ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)
    return chat_pb2.ChatCompletionChunk(id=COMPLETION_ID, choices=[choice], sequence_number=sequence_number)


def words(*numbered: tuple[int, str]) -> list[chat_pb2.ChatCompletionChunk]:
    return [chunk(n, text) for n, text in numbered]


FINISH = chunk(99, finish_reason="stop")


class FakeCall:
    """A streaming call that sends its chunks, then ends with `error` (None: ends normally)."""

    def __init__(
        self,
        chunks: list[chat_pb2.ChatCompletionChunk],
        error: tuple[grpc.StatusCode, str] | None = None,
        from_gateway: bool = False,
    ) -> None:
        self.chunks, self.error, self.from_gateway, self.cancelled = chunks, error, from_gateway, False

    def __iter__(self) -> Iterator[chat_pb2.ChatCompletionChunk]:
        yield from self.chunks
        if self.error is not None:
            raise FakeRpcError(*self.error, from_gateway=self.from_gateway)

    async def __aiter__(self) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        for c in self:
            yield c

    def cancel(self) -> None:
        self.cancelled = True


class FakeGateway:
    """Hands out scripted calls: the stream's first call, then one per resume, recording the cursors."""

    def __init__(self, first: FakeCall, *resumed: FakeCall) -> None:
        self._first, self._resumed = first, list(resumed)
        self.starts = 0
        self.resumes: list[tuple[str, int]] = []

    def start(self) -> FakeCall:
        self.starts += 1
        return self._first

    def resume(self, completion_id: str, after: int) -> FakeCall:
        self.resumes.append((completion_id, after))
        return self._resumed.pop(0)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The backoffs the stream waits, recorded instead of slept."""
    waited: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", waited.append)
    return waited


def read(gateway: FakeGateway, max_resumes: int = 3) -> str:
    stream = Stream(gateway.start, gateway.resume, max_retries=2, max_resumes=max_resumes)
    return "".join(c.choices[0].delta.content for c in stream)


def test_a_dropped_stream_resumes_after_the_last_chunk_received(sleeps: list[float]) -> None:
    gateway = FakeGateway(
        FakeCall([chunk(0), *words((2, "Hello"), (5, " wide"))], DROPPED),
        FakeCall([*words((7, " world")), FINISH]),
    )
    assert read(gateway) == "Hello wide world"
    assert gateway.starts == 1 and gateway.resumes == [(COMPLETION_ID, 5)]
    assert sleeps == [client_module.RESUME_BACKOFF_SECONDS]


def test_chunks_a_resume_sends_again_are_not_handed_out_twice(sleeps: list[float]) -> None:
    gateway = FakeGateway(
        FakeCall([chunk(0), *words((2, "a"), (3, "b"))], DROPPED),
        FakeCall([*words((2, "a"), (3, "b"), (4, "c")), FINISH]),  # a server that overlaps
    )
    assert read(gateway) == "abc"


def test_each_resume_starts_after_what_the_one_before_delivered(sleeps: list[float]) -> None:
    gateway = FakeGateway(
        FakeCall([chunk(0), *words((1, "a"))], DROPPED),
        FakeCall(words((2, "b"), (4, "c")), DROPPED),
        FakeCall([*words((6, "d")), FINISH]),
    )
    assert read(gateway, max_resumes=1) == "abcd"  # one try in a row each time: each brought chunks
    assert gateway.resumes == [(COMPLETION_ID, 1), (COMPLETION_ID, 4)]


def test_gives_up_after_max_resumes_tries_in_a_row_without_a_chunk(sleeps: list[float]) -> None:
    gateway = FakeGateway(
        FakeCall([chunk(0), *words((1, "a"))], DROPPED),
        *(
            FakeCall([], (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"))
            for _ in range(3)
        ),
    )
    with pytest.raises(APIConnectionError, match="failed to connect"):
        read(gateway, max_resumes=3)
    assert gateway.resumes == [(COMPLETION_ID, 1)] * 3
    assert sleeps == [0.25, 0.5, 1.0]  # doubling backoff


def test_max_resumes_zero_never_resumes(sleeps: list[float]) -> None:
    gateway = FakeGateway(FakeCall([chunk(0), *words((1, "a"))], DROPPED))
    with pytest.raises(APIConnectionError):
        read(gateway, max_resumes=0)
    assert gateway.resumes == []


@pytest.mark.parametrize(
    "error",
    [
        (grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)"),
        (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2"),
        (grpc.StatusCode.UNKNOWN, "Stream removed"),
    ],
    ids=["unavailable", "rst-stream", "stream-removed"],
)
def test_transport_failures_are_resumed(error: tuple[grpc.StatusCode, str], sleeps: list[float]) -> None:
    gateway = FakeGateway(FakeCall([chunk(0), *words((1, "a"))], error), FakeCall([*words((3, "b")), FINISH]))
    assert read(gateway) == "ab"


@pytest.mark.parametrize(
    "error",
    [
        (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the completion finished"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "over the limit"),
        (grpc.StatusCode.INVALID_ARGUMENT, "json_validate_failed"),
        (grpc.StatusCode.ABORTED, "the job cannot go on"),
        (grpc.StatusCode.CANCELLED, "Locally cancelled by application!"),
        (grpc.StatusCode.INTERNAL, "the job was abandoned: its workers keep dying"),
        (grpc.StatusCode.NOT_FOUND, "no completion with id"),
    ],
    ids=lambda e: e.name if isinstance(e, grpc.StatusCode) else "",
)
@pytest.mark.parametrize("from_gateway", [True, False], ids=["with-details", "bare"])
def test_a_status_the_server_chose_is_raised_not_resumed(
    error: tuple[grpc.StatusCode, str], from_gateway: bool, sleeps: list[float]
) -> None:
    gateway = FakeGateway(FakeCall([chunk(0), *words((1, "a"))], error, from_gateway))
    with pytest.raises(APIError) as caught:
        read(gateway)
    assert caught.value.code == error[0] and gateway.resumes == [] and sleeps == []


def test_an_unavailable_the_gateway_sent_is_its_answer_not_a_drop(sleeps: list[float]) -> None:
    """The gateway ended the call (and its job), e.g. on losing Redis: a resume would find the same end."""
    error = (grpc.StatusCode.UNAVAILABLE, "job queue unreachable; retry the request")
    gateway = FakeGateway(FakeCall([chunk(0), *words((1, "a"))], error, from_gateway=True))
    with pytest.raises(APIConnectionError, match="job queue unreachable"):
        read(gateway)
    assert gateway.resumes == []


def test_a_drop_before_the_first_chunk_is_raised(sleeps: list[float]) -> None:
    """Nothing received: there is no completion id to resume (the call may never have been queued)."""
    gateway = FakeGateway(FakeCall([], DROPPED))
    with pytest.raises(APIConnectionError):
        read(gateway)
    assert gateway.resumes == [] and gateway.starts == 1


def test_a_resume_that_finds_no_completion_raises_not_found(sleeps: list[float]) -> None:
    gateway = FakeGateway(
        FakeCall([chunk(0), *words((1, "a"))], DROPPED),
        FakeCall([], (grpc.StatusCode.NOT_FOUND, "no completion with id")),
    )
    with pytest.raises(APIError) as caught:
        read(gateway)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND and len(gateway.resumes) == 1


def test_closing_the_stream_cancels_the_resumed_call(sleeps: list[float]) -> None:
    resumed = FakeCall([*words((3, "b"), (4, "c")), FINISH])
    gateway = FakeGateway(FakeCall([chunk(0), *words((1, "a"))], DROPPED), resumed)
    with Stream(gateway.start, gateway.resume, max_retries=2, max_resumes=3) as stream:
        texts = []
        for c in stream:
            texts.append(c.choices[0].delta.content)
            if c.sequence_number == 3:
                break
    assert texts == ["", "a", "b"] and resumed.cancelled


async def test_async_stream_resumes_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    waited: list[float] = []

    async def no_sleep(seconds: float) -> None:
        waited.append(seconds)

    monkeypatch.setattr(client_module.asyncio, "sleep", no_sleep)
    gateway = FakeGateway(
        FakeCall([chunk(0), *words((2, "Hello"))], (grpc.StatusCode.INTERNAL, "Received RST_STREAM")),
        FakeCall([*words((2, "Hello"), (4, " world")), FINISH]),
    )
    stream = AsyncStream(gateway.start, gateway.resume, max_retries=2, max_resumes=3)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content for c in chunks) == "Hello world"
    assert [c.sequence_number for c in chunks] == [0, 2, 4, 99]
    assert gateway.resumes == [(COMPLETION_ID, 2)] and waited == [0.25]


class FakeDroppingService(chat_pb2_grpc.ChatServiceServicer):
    """Streams two chunks and fails UNAVAILABLE, as a gateway that went away; resumes the rest."""

    def __init__(self) -> None:
        self.resumes: list[tuple[chat_pb2.ResumeChatCompletionRequest, dict[str, str], float | None]] = []

    def StreamChatCompletion(self, request, context):  # type: ignore[no-untyped-def]
        yield chunk(0)
        yield chunk(1, "Hello")
        context.abort(grpc.StatusCode.UNAVAILABLE, "going away")

    def ResumeChatCompletion(self, request, context):  # type: ignore[no-untyped-def]
        self.resumes.append((request, dict(context.invocation_metadata()), context.time_remaining()))
        yield chunk(2, " world")
        yield FINISH


def test_the_client_resumes_with_its_credentials_and_the_streams_deadline() -> None:
    service = FakeDroppingService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    chat_pb2_grpc.add_ChatServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", api_key="sk-test") as client:
            stream = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True, timeout=2
            )
            text = "".join(c.choices[0].delta.content for c in stream)
    finally:
        server.stop(None)
    assert text == "Hello world"
    [(request, metadata, time_remaining)] = service.resumes
    assert request.id == COMPLETION_ID and request.HasField("starting_after") and request.starting_after == 1
    assert metadata["authorization"] == "Bearer sk-test"
    assert "idempotency-key" not in metadata  # a resume creates nothing
    # What is left of the stream's 2 s, not 2 s anew: the backoff at least has passed. (gRPC rounds
    # a deadline up as it sends it, by more the longer it is: a short one keeps the test exact.)
    assert time_remaining is not None and time_remaining < 2 - client_module.RESUME_BACKOFF_SECONDS + 0.1
