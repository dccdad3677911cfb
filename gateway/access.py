"""Who may see what besides chat calls: the model list and server reflection (GATEWAY_AUTH=on).

Chat calls check their key in gateway/relay.py. The calls that only describe the service
(gRPC ListModels, HTTP GET /models and /models/{id}, gRPC server reflection) take the same
keys here, so that a caller without a key learns nothing, and each key sees only the models
it may use: a model it may not use is "not found", as an unknown one is.
"""

from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_status import rpc_status

from gateway.auth import Authenticator
from gateway.catalog import ModelCatalog, ServedModel
from gateway.errors import ModelNotFound, ServiceError

_REFLECTION_PREFIX = "/grpc.reflection."  # v1alpha and v1 alike

Metadata = Sequence[tuple[str, str | bytes]]


class ModelDirectory:
    """The catalog as one caller may see it."""

    def __init__(self, catalog: ModelCatalog, authenticator: Authenticator | None) -> None:
        self._catalog = catalog
        self._authenticator = authenticator  # None: GATEWAY_AUTH=off, everybody sees every model

    async def visible(self, metadata: Metadata) -> list[ServedModel]:
        """The models the caller's key may use; raises Unauthenticated or PermissionDenied."""
        if self._authenticator is None:
            return list(self._catalog)
        record = await self._authenticator.authenticate(metadata, None)
        return [m for m in self._catalog if record.may_use(m.name)]

    async def get(self, metadata: Metadata, name: str) -> ServedModel:
        """The model a name or alias names, if the caller may use it; else ModelNotFound."""
        visible = await self.visible(metadata)
        served = self._catalog.get(name)
        if served is None or served.name not in {m.name for m in visible}:
            raise ModelNotFound(name, [m.name for m in visible])
        return served


class ReflectionKeyCheck(grpc.aio.ServerInterceptor):
    """Server reflection only for callers with a valid key, when GATEWAY_REFLECTION=on with auth."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if not handler_call_details.method.startswith(_REFLECTION_PREFIX):
            return await continuation(handler_call_details)
        try:
            await self._authenticator.authenticate(handler_call_details.invocation_metadata or (), None)
        except ServiceError as exc:
            return _refusal(exc)
        return await continuation(handler_call_details)


def _refusal(error: ServiceError) -> grpc.RpcMethodHandler:
    status = rpc_status.to_status(error.to_status())

    async def refuse(requests: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort_with_status(status)

    return grpc.stream_stream_rpc_method_handler(refuse)
