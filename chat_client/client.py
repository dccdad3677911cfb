"""Sync and async clients: `client.chat.completions.create(...)` and `client.models.list()`."""

import os
from collections.abc import AsyncIterator, Iterator, Mapping
from types import TracebackType
from typing import Any, Literal, overload

import grpc

from chat.v1 import chat_pb2, chat_pb2_grpc
from chat_client.errors import from_rpc_error
from chat_client.request import build_request
from chat_client.types import ChatCompletion, ChatCompletionChunk, Model

DEFAULT_ADDRESS = "localhost:50051"


def _address(address: str | None) -> str:
    return address or os.environ.get("CHAT_SERVICE_ADDRESS") or DEFAULT_ADDRESS


class Stream:
    """Iterator of chunks; closing it (or leaving a `with` block) cancels the call."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[ChatCompletionChunk]:
        try:
            for chunk in self._call:
                yield ChatCompletionChunk.from_proto(chunk)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

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


class _Completions:
    def __init__(self, client: "Client") -> None:
        self._client = client

    @overload
    def create(self, *, stream: Literal[False] = ..., **kwargs: Any) -> ChatCompletion: ...
    @overload
    def create(self, *, stream: Literal[True], **kwargs: Any) -> Stream: ...

    def create(
        self, *, stream: bool = False, timeout: float | None = None, **kwargs: Any
    ) -> ChatCompletion | Stream:
        request = build_request(**self._client._resolve(kwargs))
        timeout = timeout if timeout is not None else self._client.timeout
        if stream:
            return Stream(self._client._stub.StreamChatCompletion(request, timeout=timeout))
        try:
            return ChatCompletion.from_proto(self._client._stub.ChatCompletion(request, timeout=timeout))
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
        **kwargs: Any,
    ) -> ChatCompletion | AsyncStream:
        request = build_request(**self._client._resolve(kwargs))
        timeout = timeout if timeout is not None else self._client.timeout
        if stream:
            return AsyncStream(self._client._stub.StreamChatCompletion(request, timeout=timeout))
        try:
            return ChatCompletion.from_proto(
                await self._client._stub.ChatCompletion(request, timeout=timeout)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


class _Chat:
    def __init__(self, completions: Any) -> None:
        self.completions = completions


class _BaseClient:
    def __init__(self, timeout: float | None, model_aliases: Mapping[str, str] | None) -> None:
        self.timeout = timeout
        self._aliases = dict(model_aliases or {})

    def _resolve(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Applies model aliases, so code written for other model names runs unchanged."""
        model = kwargs.get("model", "")
        return {**kwargs, "model": self._aliases.get(model, model)}


def _models(reply: chat_pb2.ListModelsResponse) -> list[Model]:
    return [Model(m.id, m.object, m.created, m.owned_by, m.context_window) for m in reply.data]


class Client(_BaseClient):
    """Blocking client.

    address: host:port of the gateway (default: $CHAT_SERVICE_ADDRESS, else localhost:50051).
    timeout: default deadline in seconds for each call (None: the gateway's default).
    model_aliases: maps model names used in calling code to models this service runs.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float | None = None,
        model_aliases: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(timeout, model_aliases)
        self._channel = grpc.insecure_channel(_address(address))
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
        timeout: float | None = None,
        model_aliases: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(timeout, model_aliases)
        self._channel = grpc.aio.insecure_channel(_address(address))
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
                self._client._stub.ListModels(chat_pb2.ListModelsRequest(), timeout=self._client.timeout)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


class _AsyncModels:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def list(self) -> list[Model]:
        try:
            request = chat_pb2.ListModelsRequest()
            return _models(await self._client._stub.ListModels(request, timeout=self._client.timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
