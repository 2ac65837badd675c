"""grpc.aio adapter: the policy stack behind ordinary stubs, one interceptor class per call arity.

grpc.aio sorts interceptors by an isinstance chain, so a class implementing two arities only
intercepts the first (grpc#31442): four small classes share one Invoker (client/invoke.py), which
runs every call, unary or streaming, through the target's one policy stack.

The interceptors do not call their continuation: the stack picks an endpoint per attempt and the
terminal sends the attempt on that endpoint's own channel (client/endpoints.py), with the method's
(de)serializers from the protobuf descriptor pool (client/methods.py). Methods that are not
protobuf fall back to the continuation, i.e. the front channel's single endpoint (unary calls keep
the stack; streams of such methods go out as they are).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from grpc.aio import ClientCallDetails

from aivo_mesh.client.invoke import Invoker, method_info


class UnaryUnaryAdapter(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, invoker: Invoker) -> None:
        self._invoker = invoker

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        d = client_call_details
        value, answered = await self._invoker.unary(d.method, request, d.timeout, d.metadata, d.credentials,
                                                    d.wait_for_ready, None, continuation, d)
        # The finished call, not just its value: grpc.aio then serves the caller's
        # `initial_metadata()`/`trailing_metadata()`/`code()` from the attempt that answered.
        return answered if answered is not None else value


class _StreamAdapter:
    kind = ""

    def __init__(self, invoker: Invoker) -> None:
        self._invoker = invoker

    async def _start(self, continuation: Callable[..., Any], d: ClientCallDetails, request: Any) -> Any:
        if method_info(d.method.decode() if isinstance(d.method, bytes) else str(d.method)) is None:
            return await continuation(d, request)
        return await self._invoker.stream(self.kind, d.method, request, d.timeout, d.metadata, d.credentials,
                                          d.wait_for_ready)


class UnaryStreamAdapter(_StreamAdapter, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    kind = "unary_stream"

    async def intercept_unary_stream(self, continuation: Callable[..., Any], client_call_details: ClientCallDetails,
                                     request: Any) -> Any:
        return await self._start(continuation, client_call_details, request)


class StreamUnaryAdapter(_StreamAdapter, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    kind = "stream_unary"

    async def intercept_stream_unary(self, continuation: Callable[..., Any], client_call_details: ClientCallDetails,
                                     request_iterator: Any) -> Any:
        return await self._start(continuation, client_call_details, request_iterator)


class StreamStreamAdapter(_StreamAdapter, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    kind = "stream_stream"

    async def intercept_stream_stream(self, continuation: Callable[..., Any], client_call_details: ClientCallDetails,
                                      request_iterator: Any) -> Any:
        return await self._start(continuation, client_call_details, request_iterator)


def interceptors(invoker: Invoker) -> list[grpc.aio.ClientInterceptor]:
    """One adapter per arity, over one invoker."""
    return [UnaryUnaryAdapter(invoker), UnaryStreamAdapter(invoker), StreamUnaryAdapter(invoker),
            StreamStreamAdapter(invoker)]
