"""Server adapter: one grpc.aio ServerInterceptor that guards every handler of every arity.

grpc.aio server interceptors get no ServicerContext, so we wrap the RpcMethodHandler's behaviour
(the only place `auth_context()` is reachable) for the four arities. Per call it:
1. rejects any TLS version but 1.3 (grpcio has no knob to refuse 1.2 at the handshake);
2. takes the caller identity from the client certificate and checks the allow-list;
3. publishes the caller and the inbound deadline in context variables, so a handler that calls
   another service passes on its remaining deadline (see policy.deadline.inbound_deadline).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import grpc

from aivo_mesh.policy.core import monotonic
from aivo_mesh.policy.deadline import inbound_deadline
from aivo_mesh.server.authz import Authorizer, peer_identity, tls_version

current_caller: ContextVar[str | None] = ContextVar("aivo_mesh_current_caller", default=None)

REQUIRED_TLS = "TLSv1.3"


class Denied(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details
        super().__init__(details)


class MeshServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, authorizer: Authorizer | None, *, require_tls: bool = True) -> None:
        self._authz = authorizer
        self._require_tls = require_tls

    def _admit(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """Raise Denied unless this caller may call `method`; set the context variables."""
        remaining = context.time_remaining()
        inbound_deadline.set(None if remaining is None else monotonic() + remaining)
        if not self._require_tls:
            current_caller.set(None)
            return
        auth = context.auth_context()
        version = tls_version(auth)
        if version != REQUIRED_TLS:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED,
                         f"mesh requires {REQUIRED_TLS}; connection negotiated {version or 'no TLS'}")
        identity = peer_identity(auth)
        current_caller.set(identity)
        if self._authz is None:
            return
        if identity is None:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
        if not self._authz.allows(identity, method):
            raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                         f"{identity} is not allowed to call {method} on {self._authz.service}")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if isinstance(method, bytes):
            method = method.decode()
        return _wrap(handler, method, self._admit)


def _wrap(
    handler: grpc.RpcMethodHandler,
    method: str,
    admit: Callable[[str, grpc.aio.ServicerContext], None],
) -> grpc.RpcMethodHandler:
    async def guard(context: grpc.aio.ServicerContext) -> None:
        try:
            admit(method, context)
        except Denied as d:
            await context.abort(d.code, d.details)

    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await guard(context)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            await guard(context)
            return await inner_su(request_iterator, context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _streaming(handler.unary_stream, guard), handler.request_deserializer,
            handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(
        _streaming(handler.stream_stream, guard), handler.request_deserializer,
        handler.response_serializer)


def _streaming(
    inner: Callable[..., Any], guard: Callable[[grpc.aio.ServicerContext], Awaitable[None]]
) -> Callable[..., Any]:
    # A streaming behaviour is either an async generator or a coroutine that uses context.write().
    if inspect.isasyncgenfunction(inner):
        async def gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await guard(context)
            async for item in inner(request, context):
                yield item

        return gen

    async def coro(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await guard(context)
        return await inner(request, context)

    return coro
