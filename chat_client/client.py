"""Sync and async clients: `client.chat.completions.create(...)`, `.retrieve(id)`, `client.models.list()`."""

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, overload

import grpc
from grpc_status import rpc_status

from chat.v1 import chat_pb2, chat_pb2_grpc
from chat_client.errors import APIError, RateLimitError, from_rpc_error
from chat_client.request import build_request
from chat_client.types import ChatCompletion, ChatCompletionChunk, Model

DEFAULT_ADDRESS = "localhost:50051"
MAX_RETRY_WAIT_SECONDS = 60.0
# A dropped stream is resumed after this long, doubled for each try in a row that gets no chunk.
# The gateway keeps a dropped stream's job running for a grace period (10 s by default) and as
# long as a resumed call reads it, so the tries must start well within that period.
RESUME_BACKOFF_SECONDS = 0.25
MAX_RESUME_BACKOFF_SECONDS = 2.0

# What gRPC core says when a stream is torn down with its connection (a reset stream, a closed
# socket) and it reports INTERNAL or UNKNOWN rather than UNAVAILABLE.
_CONNECTION_LOST_MESSAGES = (
    "RST_STREAM",
    "Stream removed",
    "Socket closed",
    "Connection reset",
    "Broken pipe",
)


def _channel(transport: Any, address: str | None, tls: "TLS | None") -> Any:
    """A channel from `grpc` or `grpc.aio` to address ($CHAT_SERVICE_ADDRESS, else localhost:50051)."""
    target = address or os.environ.get("CHAT_SERVICE_ADDRESS") or DEFAULT_ADDRESS
    return transport.secure_channel(target, tls.credentials()) if tls else transport.insecure_channel(target)


def _retry_delay(error: APIError, attempt: int, max_retries: int) -> float | None:
    """How long to wait before retrying a refused call (its RetryInfo delay), or None to give up.

    Only a refusal that carries RetryInfo is retried: without it (a request over a hard limit,
    or larger than the key's tokens per minute) waiting does not help, and each retry would
    count against the key's budget again.
    """
    if not isinstance(error, RateLimitError) or error.retry_after is None or attempt >= max_retries:
        return None
    return error.retry_after if error.retry_after <= MAX_RETRY_WAIT_SECONDS else None


@dataclass(frozen=True)
class TLS:
    """TLS to the gateway: the CA to trust (None: system roots); a client certificate and key for mTLS."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


def _connection_dropped(error: grpc.RpcError) -> bool:
    """Did the call end because its connection broke, rather than with a status the server chose?

    Every status the gateway chooses carries a google.rpc.Status in its trailers, and is the
    call's answer (an UNAVAILABLE among them: the gateway has ended the call and its job). gRPC
    makes up a status without one when the connection breaks: UNAVAILABLE (lost or refused, a
    server going away), or INTERNAL and UNKNOWN in gRPC core's words for a stream torn down under
    it. CANCELLED is what closing a stream ends it with, and is never resumed.
    """
    if rpc_status.from_call(error) is not None:
        return False
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    details = error.details() or ""
    lost = any(message in details for message in _CONNECTION_LOST_MESSAGES)
    return lost and code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


class _StreamProgress:
    """What a stream has handed its caller, and how to go on when its call fails.

    Stream and AsyncStream share it; they differ only in how they wait and iterate.
    """

    def __init__(self, max_retries: int, max_resumes: int) -> None:
        self.max_retries = max_retries
        self.max_resumes = max_resumes
        self.completion_id = ""
        self.last_sequence: int | None = None  # of the last chunk handed out; None: none yet
        self.resumed = False  # the call now read is a resume
        self.retries = 0  # of the call's start, refused with RetryInfo
        self.resumes_without_chunk = 0  # resumes in a row that brought nothing new

    def accept(self, chunk: chat_pb2.ChatCompletionChunk) -> ChatCompletionChunk | None:
        """The chunk for the caller, or None when the caller has it already.

        A resumed call sends only what lies after its cursor; checking it here as well means a
        caller never sees a chunk twice, whatever the server does. (Only there: the first call's
        chunks are all new, also from a gateway older than sequence numbers, which sends 0.)
        """
        if self.resumed and self.last_sequence is not None and chunk.sequence_number <= self.last_sequence:
            return None
        self.completion_id, self.last_sequence = chunk.id, chunk.sequence_number
        self.resumes_without_chunk = 0
        return ChatCompletionChunk.from_proto(chunk)

    def next_try(self, exc: grpc.RpcError) -> tuple[float, bool]:
        """After the call failed: (seconds to wait, whether to resume rather than start again).
        Raises the call's APIError when it is not to be tried again."""
        error = from_rpc_error(exc)
        if self.last_sequence is None:
            # Nothing received: the start was refused. No completion to resume yet, and only a
            # refusal with RetryInfo is worth repeating.
            delay = _retry_delay(error, self.retries, self.max_retries)
            if delay is None:
                raise error from None
            self.retries += 1
            return delay, False
        if not _connection_dropped(exc) or self.resumes_without_chunk >= self.max_resumes:
            raise error from None
        backoff = RESUME_BACKOFF_SECONDS * 2**self.resumes_without_chunk
        self.resumes_without_chunk += 1
        self.resumed = True
        return min(backoff, MAX_RESUME_BACKOFF_SECONDS), True


# Starts a ResumeChatCompletion call: (completion id, sequence number to resume after) -> call.
Resumer = Callable[[str, int], Any]


class Stream:
    """Iterator of chunks; closing it (or leaving a `with` block) cancels the call.

    A call refused with RESOURCE_EXHAUSTED before its first chunk is retried after the
    server's RetryInfo delay, up to the client's max_retries. A stream whose connection drops
    after its first chunk is resumed after the last chunk received, up to max_resumes tries in a
    row without a new chunk: the caller gets every chunk once, as if nothing had happened.
    """

    def __init__(self, start: Callable[[], Any], resume: Resumer, max_retries: int, max_resumes: int) -> None:
        self._start = start
        self._resume = resume
        self._progress = _StreamProgress(max_retries, max_resumes)
        self._closed = False
        self._call = start()

    def __iter__(self) -> Iterator[ChatCompletionChunk]:
        progress = self._progress
        while True:
            try:
                for chunk in self._call:
                    if (fresh := progress.accept(chunk)) is not None:
                        yield fresh
                return
            except grpc.RpcError as exc:
                delay, resume = progress.next_try(exc)
            time.sleep(delay)
            if self._closed:
                return  # closed while waiting: the caller wants no more
            if resume:
                assert progress.last_sequence is not None
                self._call = self._resume(progress.completion_id, progress.last_sequence)
            else:
                self._call = self._start()

    def close(self) -> None:
        self._closed = True
        self._call.cancel()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream:
    """Async iterator of chunks; `close()` cancels the call. Retries and resumes as Stream does."""

    def __init__(self, start: Callable[[], Any], resume: Resumer, max_retries: int, max_resumes: int) -> None:
        self._start = start
        self._resume = resume
        self._progress = _StreamProgress(max_retries, max_resumes)
        self._closed = False
        self._call = start()

    async def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        progress = self._progress
        while True:
            try:
                async for chunk in self._call:
                    if (fresh := progress.accept(chunk)) is not None:
                        yield fresh
                return
            except grpc.RpcError as exc:
                delay, resume = progress.next_try(exc)
            await asyncio.sleep(delay)
            if self._closed:
                return
            if resume:
                assert progress.last_sequence is not None
                self._call = self._resume(progress.completion_id, progress.last_sequence)
            else:
                self._call = self._start()

    def close(self) -> None:
        self._closed = True
        self._call.cancel()


class _BaseClient:
    _stub: chat_pb2_grpc.ChatServiceStub

    def __init__(
        self,
        timeout: float | None,
        model_aliases: Mapping[str, str] | None,
        api_key: str | None,
        max_retries: int,
        max_resumes: int,
    ) -> None:
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_resumes = max_resumes
        self._aliases = dict(model_aliases or {})
        key = api_key if api_key is not None else os.environ.get("CHAT_API_KEY")
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {key}"),) if key else ()

    def _resolve(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Applies model aliases, so code written for other model names runs unchanged."""
        model = kwargs.get("model", "")
        return {**kwargs, "model": self._aliases.get(model, model)}

    def _options(self, timeout: float | None, idempotency_key: str | None = None) -> dict[str, Any]:
        metadata = self.metadata + ((("idempotency-key", idempotency_key),) if idempotency_key else ())
        return {"timeout": timeout if timeout is not None else self.timeout, "metadata": metadata}

    def _resumer(self, timeout: float | None) -> Resumer:
        """Starts ResumeChatCompletion calls for a stream created now with this timeout: with the
        client's credentials, within what is left of the stream's deadline."""
        timeout = timeout if timeout is not None else self.timeout
        ends_at = None if timeout is None else time.monotonic() + timeout

        def resume(completion_id: str, after: int) -> Any:
            left = None if ends_at is None else max(0.0, ends_at - time.monotonic())
            request = chat_pb2.ResumeChatCompletionRequest(id=completion_id, starting_after=after)
            return self._stub.ResumeChatCompletion(request, **self._options(left))

        return resume


def _idempotency_key(given: str | None) -> str:
    """One key per logical call, sent with each of its retries: the gateway then runs it once,
    and charges it once, however many times it is sent (gateway/idempotency.py)."""
    return given if given is not None else f"chat-client-{uuid.uuid4()}"


class _Completions:
    def __init__(self, client: "Client") -> None:
        self._client = client

    @overload
    def create(self, *, stream: Literal[False] = ..., **kwargs: Any) -> ChatCompletion: ...
    @overload
    def create(self, *, stream: Literal[True], **kwargs: Any) -> Stream: ...

    def create(
        self,
        *,
        stream: bool = False,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        **kwargs: Any,
    ) -> ChatCompletion | Stream:
        client = self._client
        request = build_request(**client._resolve(kwargs))
        options = client._options(timeout, _idempotency_key(idempotency_key))
        if stream:
            return Stream(
                lambda: client._stub.StreamChatCompletion(request, **options),
                client._resumer(timeout),
                client.max_retries,
                client.max_resumes,
            )
        attempt = 0
        while True:
            try:
                return ChatCompletion.from_proto(client._stub.ChatCompletion(request, **options))
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if (delay := _retry_delay(error, attempt, client.max_retries)) is None:
                    raise error from None
            attempt += 1
            time.sleep(delay)

    def retrieve(self, completion_id: str, *, timeout: float | None = None) -> ChatCompletion:
        """A completion by id, finished or as far as it has got (finish_reason "" and usage zero
        until it ends); NotFoundError once past the gateway's retention window."""
        request = chat_pb2.GetChatCompletionRequest(id=completion_id)
        try:
            return ChatCompletion.from_proto(
                self._client._stub.GetChatCompletion(request, **self._client._options(timeout))
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


class _AsyncCompletions:
    def __init__(self, client: "AsyncClient") -> None:
        self._client = client

    @overload
    async def create(self, *, stream: Literal[False] = ..., **kwargs: Any) -> ChatCompletion: ...
    @overload
    async def create(self, *, stream: Literal[True], **kwargs: Any) -> AsyncStream: ...

    async def create(
        self,
        *,
        stream: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - the gRPC deadline, as in the SDK
        idempotency_key: str | None = None,
        **kwargs: Any,
    ) -> ChatCompletion | AsyncStream:
        client = self._client
        request = build_request(**client._resolve(kwargs))
        options = client._options(timeout, _idempotency_key(idempotency_key))
        if stream:
            return AsyncStream(
                lambda: client._stub.StreamChatCompletion(request, **options),
                client._resumer(timeout),
                client.max_retries,
                client.max_resumes,
            )
        attempt = 0
        while True:
            try:
                return ChatCompletion.from_proto(await client._stub.ChatCompletion(request, **options))
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if (delay := _retry_delay(error, attempt, client.max_retries)) is None:
                    raise error from None
            attempt += 1
            await asyncio.sleep(delay)

    async def retrieve(
        self,
        completion_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the gRPC deadline, as in create
    ) -> ChatCompletion:
        """As Client.chat.completions.retrieve."""
        request = chat_pb2.GetChatCompletionRequest(id=completion_id)
        try:
            return ChatCompletion.from_proto(
                await self._client._stub.GetChatCompletion(request, **self._client._options(timeout))
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


class _Chat:
    def __init__(self, completions: Any) -> None:
        self.completions = completions


def _models(reply: chat_pb2.ListModelsResponse) -> list[Model]:
    return [Model(m.id, m.object, m.created, m.owned_by, m.context_window) for m in reply.data]


class Client(_BaseClient):
    """Blocking client.

    address: host:port of the gateway (default: $CHAT_SERVICE_ADDRESS, else localhost:50051).
    api_key: sent as `authorization: Bearer <key>` (default: $CHAT_API_KEY; none when unset).
    tls: a TLS() to connect with TLS or mutual TLS; None for plaintext.
    timeout: default deadline in seconds for each call (None: the gateway's default).
    max_retries: how often a call refused with RESOURCE_EXHAUSTED is retried after its RetryInfo delay.
        Every call sends an `idempotency-key` (fresh, or create(idempotency_key=...)) and keeps
        it across its retries, so the gateway queues and charges one logical call once.
    max_resumes: how often in a row a stream whose connection dropped is resumed (ResumeChatCompletion
        after the last chunk received; free) without getting a new chunk; 0: never resumed.
    model_aliases: maps model names used in calling code to models this service runs.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        api_key: str | None = None,
        tls: TLS | None = None,
        timeout: float | None = None,
        max_retries: int = 2,
        max_resumes: int = 3,
        model_aliases: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(timeout, model_aliases, api_key, max_retries, max_resumes)
        self._channel = _channel(grpc, address, tls)
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self.chat = _Chat(_Completions(self))
        self.models = _SyncModels(self)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_BaseClient):
    """asyncio client with the same arguments as Client."""

    def __init__(
        self,
        address: str | None = None,
        *,
        api_key: str | None = None,
        tls: TLS | None = None,
        timeout: float | None = None,
        max_retries: int = 2,
        max_resumes: int = 3,
        model_aliases: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(timeout, model_aliases, api_key, max_retries, max_resumes)
        self._channel = _channel(grpc.aio, address, tls)
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self.chat = _Chat(_AsyncCompletions(self))
        self.models = _AsyncModels(self)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class _SyncModels:
    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self) -> list[Model]:
        try:
            return _models(
                self._client._stub.ListModels(chat_pb2.ListModelsRequest(), **self._client._options(None))
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


class _AsyncModels:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def list(self) -> list[Model]:
        try:
            request = chat_pb2.ListModelsRequest()
            return _models(await self._client._stub.ListModels(request, **self._client._options(None)))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
