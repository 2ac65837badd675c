"""grpc.aio adapter: the policy stack behind ordinary stubs, one interceptor class per call arity.

grpc.aio sorts interceptors by an isinstance chain, so a class implementing two arities only
intercepts the first (grpc#31442): four small classes share one `Target`. Outcomes are decided on
each attempt's final status (the terminal awaits the call), never on the call object.

The interceptor does not call its continuation: the stack picks an endpoint per attempt and the
terminal sends the attempt on that endpoint's own channel (client/endpoints.py), with the method's
(de)serializers from the protobuf descriptor pool (client/methods.py). Methods that are not
protobuf fall back to the continuation, i.e. the front channel's single endpoint.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc.aio import ClientCallDetails

from aivo_mesh.client.errors import error_for
from aivo_mesh.client.methods import MethodInfo, UnknownMethod, lookup
from aivo_mesh.client.server_check import refusal_details
from aivo_mesh.policy.core import Call, Reply
from aivo_mesh.policy.deadline import attempt_timeout

if TYPE_CHECKING:
    from aivo_mesh.client.target import Target

ATTEMPT_HEADER = "x-mesh-attempt"


def method_name(details: ClientCallDetails) -> str:
    m = details.method
    return m.decode() if isinstance(m, bytes) else str(m)


def _pairs(metadata: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(metadata) if metadata else ()


@dataclass(slots=True)
class Transport:
    """What the terminal needs beyond the Call: the caller's metadata, per-call credentials and how to
    reach the wire; and, once an attempt has succeeded, that attempt's call object."""

    info: MethodInfo | None
    metadata: tuple[tuple[str, Any], ...]
    wait_for_ready: bool | None = None
    continuation: Callable[..., Any] | None = None
    details: ClientCallDetails | None = None
    credentials: grpc.CallCredentials | None = None
    compression: grpc.Compression | None = None
    # The successful attempt's grpc.aio call: the stub path hands it to grpc.aio so the caller can
    # read its initial and trailing metadata, as on a plain channel.
    answered: Any = None


def method_info(path: str) -> MethodInfo | None:
    try:
        return lookup(path)
    except UnknownMethod:
        return None


def make_unary_terminal(target: Target) -> Callable[[Call], Any]:
    """One attempt on the wire, on the endpoint the balancer picked (once its server is vetted)."""
    pool, clock, check = target.pool, target.clock, target.server_check

    async def terminal(call: Call) -> Reply:
        t: Transport = call.transport
        timeout = attempt_timeout(call, clock(), call.per_try_timeout)
        if timeout is not None and timeout <= 0:
            return Reply("DEADLINE_EXCEEDED", details="deadline exceeded before the attempt", local=True)
        if check is not None and call.endpoint is not None and not check.vetted.get(call.endpoint):
            # A new connection: its server certificate is checked before anything is sent on it.
            refused = await check.vet(call.endpoint, timeout)
            if refused is not None:
                return Reply("UNAVAILABLE", details=refusal_details(target.service, call.endpoint, refused))
            timeout = attempt_timeout(call, clock(), call.per_try_timeout)
            if timeout is not None and timeout <= 0:
                return Reply("DEADLINE_EXCEEDED", details="deadline exceeded while connecting", local=True)
        # The attempt header goes out on retries only: its absence means attempt 1, and metadata on
        # every call costs about 4 % of throughput (parsed on both sides).
        metadata: tuple[tuple[str, Any], ...] | None = (*t.metadata, *call.metadata)
        if call.attempt > 1:
            metadata = (*metadata, (ATTEMPT_HEADER, str(call.attempt)))  # type: ignore[misc]
        metadata = metadata or None
        try:
            if t.info is not None and call.endpoint is not None:
                mc = pool.multicallable(call.endpoint, "unary_unary", t.info.path, t.info.serialize,
                                        t.info.deserialize)
                rpc = mc(call.request, timeout=timeout, metadata=metadata, credentials=t.credentials,
                         wait_for_ready=t.wait_for_ready, compression=t.compression)
            else:
                assert t.continuation is not None and t.details is not None
                d = t.details
                rpc = await t.continuation(ClientCallDetails(d.method, timeout, grpc.aio.Metadata(*(metadata or ())),
                                                             d.credentials, d.wait_for_ready), call.request)
            value = await rpc
        except grpc.aio.AioRpcError as err:
            return Reply(err.code().name, error=err, details=err.details() or "",
                         trailers=tuple(err.trailing_metadata() or ()))
        t.answered = rpc
        return Reply("OK", value=value)

    return terminal


class UnaryUnaryAdapter(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, target: Target) -> None:
        self._target = target
        # Per method (as grpc hands it over, often bytes): its path, message types and policy stack.
        self._methods: dict[Any, tuple[str, MethodInfo | None, Callable[[Call], Any]]] = {}

    def _method(self, raw: Any) -> tuple[str, MethodInfo | None, Callable[[Call], Any]]:
        m = self._methods.get(raw)
        if m is None:
            path = raw.decode() if isinstance(raw, bytes) else str(raw)
            m = self._methods[raw] = (path, method_info(path), self._target.policy.stack_for(path))
        return m

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: ClientCallDetails, request: Any
    ) -> Any:
        d = client_call_details
        value, answered = await self.invoke(d.method, request, d.timeout, d.metadata, d.credentials,
                                            d.wait_for_ready, None, continuation, d)
        # The finished call, not just its value: grpc.aio then serves the caller's
        # `initial_metadata()`/`trailing_metadata()`/`code()` from the attempt that answered.
        return answered if answered is not None else value

    async def invoke(self, method: Any, request: Any, timeout: float | None, metadata: Any,
                     credentials: grpc.CallCredentials | None, wait_for_ready: bool | None,
                     compression: grpc.Compression | None = None, continuation: Callable[..., Any] | None = None,
                     details: ClientCallDetails | None = None) -> tuple[Any, Any]:
        """One unary call through the stack: (response, the attempt's call object that answered).
        Raises the call's error. `continuation`/`details` are grpc.aio's, for methods that are not
        protobuf (sent on the front channel's single endpoint); MeshChannel dispatches here directly."""
        path, info, stack = self._method(method)
        transport = Transport(info, _pairs(metadata), wait_for_ready, continuation, details, credentials, compression)
        reply = await stack(Call(self._target.service, path, request, timeout=timeout, transport=transport))
        if reply.ok:
            return reply.value, transport.answered
        if reply.local:
            # Refused without touching the network (breaker open, limits, no endpoints): yield to the
            # loop once, as a failed RPC always does, so a caller retrying in a loop cannot starve it
            # (and with it the probe that would close the breaker).
            await asyncio.sleep(0)
        raise error_for(self._target.service, path, reply)


class _StreamAdapter:
    """Streams get the deadline, the breaker, the concurrency limit and the balancer, not retries:
    grpc.aio cannot swap the call object under a caller that is already reading it."""

    kind = ""

    def __init__(self, target: Target) -> None:
        self._target = target

    async def _start(self, continuation: Callable[..., Any], details: ClientCallDetails, request: Any) -> Any:
        path = method_name(details)
        info = method_info(path)
        if info is None:
            return await continuation(details, request)
        return await self._target.start_stream(self.kind, info, details, request)


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


def stream_adapters(target: Target) -> list[grpc.aio.ClientInterceptor]:
    return [UnaryStreamAdapter(target), StreamUnaryAdapter(target), StreamStreamAdapter(target)]


async def final_code(rpc: Any) -> str:
    """The final status name of a finished (or failed) streaming call."""
    try:
        code = await rpc.code()
    except asyncio.CancelledError:
        return "CANCELLED"
    return str(code.name)
