"""grpc.aio adapter: binds the policy stack to client interceptors, one class per call arity.

grpc.aio sorts interceptors by an isinstance chain, so a class implementing two arities only
intercepts the first (grpc#31442): four small classes share one `StackBinder`. Outcomes are
decided on each attempt's final status (we await the call), never on the call object.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from grpc.aio import ClientCallDetails

from aivo_mesh.policy.core import Call, Handler, Reply, monotonic
from aivo_mesh.policy.deadline import attempt_timeout, effective_timeout, inherited_timeout

ATTEMPT_HEADER = "x-mesh-attempt"


def method_name(details: ClientCallDetails) -> str:
    m = details.method
    return m.decode() if isinstance(m, bytes) else str(m)


def _with_header(metadata: grpc.aio.Metadata | None, key: str, value: str,
                 extra: tuple[tuple[str, str], ...] = ()) -> grpc.aio.Metadata:
    md = grpc.aio.Metadata(*(metadata or ()), *extra)
    md.add(key, value)
    return md


class StackBinder:
    """Owns the per-method policy stacks of one target service and runs calls through them."""

    def __init__(self, service: str, stack_for: Callable[[str], Handler],
                 timeout_for: Callable[[str], float | None]) -> None:
        self.service = service
        self._stack_for = stack_for
        self._timeout_for = timeout_for
        self._stacks: dict[str, Handler] = {}

    def stack(self, method: str) -> Handler:
        h = self._stacks.get(method)
        if h is None:
            h = self._stacks[method] = self._stack_for(method)
        return h

    def stream_timeout(self, details: ClientCallDetails) -> float | None:
        """Streams are not retried here; they get the overall deadline only."""
        return effective_timeout(details.timeout, self._timeout_for(method_name(details)),
                                 inherited_timeout())


async def unary_terminal(call: Call) -> Reply:
    """One attempt on the wire. `call.transport` is (continuation, details) from the interceptor."""
    continuation, details = call.transport
    timeout = attempt_timeout(call, monotonic(), None)
    attempt_details = ClientCallDetails(
        details.method, timeout, _with_header(details.metadata, ATTEMPT_HEADER, str(call.attempt), call.metadata),
        details.credentials, details.wait_for_ready)
    rpc = await continuation(attempt_details, call.request)
    try:
        value = await rpc
    except grpc.aio.AioRpcError as err:
        return Reply(err.code().name, error=err, details=err.details() or "",
                     trailers=tuple(err.trailing_metadata() or ()))
    return Reply("OK", value=value)


class UnaryUnaryAdapter(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, binder: StackBinder) -> None:
        self._binder = binder

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        method = method_name(client_call_details)
        call = Call(self._binder.service, method, request, timeout=client_call_details.timeout,
                    transport=(continuation, client_call_details))
        reply = await self._binder.stack(method)(call)
        if reply.ok:
            return reply.value
        raise as_rpc_error(reply)


def as_rpc_error(reply: Reply) -> BaseException:
    """The error the caller sees: the server's own AioRpcError, or one made for a local decision."""
    if reply.error is not None:
        err: BaseException = reply.error
        return err
    code = getattr(grpc.StatusCode, reply.code, grpc.StatusCode.UNKNOWN)
    made: BaseException = grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*reply.trailers), reply.details or None)
    return made


class _StreamTimeout:
    def __init__(self, binder: StackBinder) -> None:
        self._binder = binder

    def details(self, d: ClientCallDetails) -> ClientCallDetails:
        return ClientCallDetails(d.method, self._binder.stream_timeout(d),
                                 _with_header(d.metadata, ATTEMPT_HEADER, "1"), d.credentials,
                                 d.wait_for_ready)


class UnaryStreamAdapter(_StreamTimeout, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self.details(client_call_details), request)


class StreamUnaryAdapter(_StreamTimeout, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], client_call_details: ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await continuation(self.details(client_call_details), request_iterator)


class StreamStreamAdapter(_StreamTimeout, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], client_call_details: ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await continuation(self.details(client_call_details), request_iterator)


def adapters(binder: StackBinder) -> list[grpc.aio.ClientInterceptor]:
    return [UnaryUnaryAdapter(binder), UnaryStreamAdapter(binder), StreamUnaryAdapter(binder),
            StreamStreamAdapter(binder)]
