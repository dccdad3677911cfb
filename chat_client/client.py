"""Sync and async clients: `client.chat.completions.create(...)` and `client.models.list()`."""

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, overload

import grpc

from chat.v1 import chat_pb2, chat_pb2_grpc
from chat_client.errors import APIError, RateLimitError, from_rpc_error
from chat_client.request import build_request
from chat_client.types import ChatCompletion, ChatCompletionChunk, Model

DEFAULT_ADDRESS = "localhost:50051"
MAX_RETRY_WAIT_SECONDS = 60.0


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


class Stream:
    """Iterator of chunks; closing it (or leaving a `with` block) cancels the call.

    A call refused with RESOURCE_EXHAUSTED before its first chunk is retried after the
    server's RetryInfo delay, up to the client's max_retries.
    """

    def __init__(self, start: Callable[[], Any], max_retries: int) -> None:
        self._start = start
        self._call = start()
        self._max_retries = max_retries

    def __iter__(self) -> Iterator[ChatCompletionChunk]:
        attempt, received = 0, False
        while True:
            try:
                for chunk in self._call:
                    received = True
                    yield ChatCompletionChunk.from_proto(chunk)
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                delay = None if received else _retry_delay(error, attempt, self._max_retries)
                if delay is None:
                    raise error from None
            attempt += 1
            time.sleep(delay)
            self._call = self._start()

    def close(self) -> None:
        self._call.cancel()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream:
    """Async iterator of chunks; `close()` cancels the call."""

    def __init__(self, call: Any) -> None:
        self._call = call

    async def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        try:
            async for chunk in self._call:
                yield ChatCompletionChunk.from_proto(chunk)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def close(self) -> None:
        self._call.cancel()


class _BaseClient:
    def __init__(
        self,
        timeout: float | None,
        model_aliases: Mapping[str, str] | None,
        api_key: str | None,
        max_retries: int,
    ) -> None:
        self.timeout = timeout
        self.max_retries = max_retries
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
            return Stream(lambda: client._stub.StreamChatCompletion(request, **options), client.max_retries)
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
            return AsyncStream(client._stub.StreamChatCompletion(request, **options))
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
        model_aliases: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(timeout, model_aliases, api_key, max_retries)
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
        model_aliases: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(timeout, model_aliases, api_key, max_retries)
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
