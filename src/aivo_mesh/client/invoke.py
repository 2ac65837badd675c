"""The one seam between grpc.aio and the policy stack: every call, of every arity, enters here.

    Invoker.unary(...)    a unary call: the stack runs the attempts; returns (response, answering call)
    Invoker.stream(...)   a streaming call: the same stack admits it (deadline, limit, breaker, balancer),
                          the terminal opens it on the picked endpoint and returns its grpc.aio call
                          with a future for its end; the layers finish their bookkeeping then (a
                          stream holds its concurrency slot, and counts for the breaker and outlier
                          detection, when it ends, not when it opens)

The grpc.aio interceptor classes (client/interceptors.py) and MeshChannel (client/mesh_channel.py) are
thin callers of an Invoker; the Invoker knows its target only through `InvokeTarget`, a small protocol
(`client.target.Target` implements it), so neither of them imports the target.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc.aio import ClientCallDetails

from aivo_mesh.client.endpoints import EndpointPool
from aivo_mesh.client.errors import error_for
from aivo_mesh.client.methods import MethodInfo, UnknownMethod, lookup
from aivo_mesh.client.server_check import ServerCheck, refusal_details
from aivo_mesh.policy.core import ATTEMPT_HEADER, Call, Clock, Handler, LocalReason, Reply
from aivo_mesh.policy.deadline import attempt_timeout

UNARY = "unary_unary"
STREAM_KINDS = ("unary_stream", "stream_unary", "stream_stream")


class InvokeTarget(Protocol):
    """What the seam needs from one target service."""

    service: str
    pool: EndpointPool
    clock: Clock
    server_check: ServerCheck | None

    def stack_for(self, method: str) -> Handler: ...


def method_info(path: str) -> MethodInfo | None:
    try:
        return lookup(path)
    except UnknownMethod:
        return None


def pairs(metadata: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(metadata) if metadata else ()


@dataclass(slots=True)
class Transport:
    """What the terminal needs beyond the Call: the call's arity, the caller's metadata, per-call
    credentials and how to reach the wire; and, once an attempt has answered, that attempt's call."""

    kind: str
    info: MethodInfo | None
    metadata: tuple[tuple[str, Any], ...]
    wait_for_ready: bool | None = None
    continuation: Callable[..., Any] | None = None
    details: ClientCallDetails | None = None
    credentials: grpc.CallCredentials | None = None
    compression: grpc.Compression | None = None
    # The answering attempt's grpc.aio call: for a unary call, what the stub path hands to grpc.aio so
    # the caller reads its metadata as on a plain channel; for a stream, the stream itself.
    answered: Any = None


def make_terminal(target: InvokeTarget) -> Handler:
    """One attempt on the wire, on the endpoint the balancer picked, once its server is vetted."""
    pool, clock, check = target.pool, target.clock, target.server_check

    async def terminal(call: Call) -> Reply:
        t: Transport = call.transport
        timeout = attempt_timeout(call, clock(), call.per_try_timeout)
        if timeout is not None and timeout <= 0:
            return Reply("DEADLINE_EXCEEDED", details="deadline exceeded before the attempt",
                         local=LocalReason.DEADLINE)
        if check is not None and call.endpoint is not None and not check.vetted.get(call.endpoint):
            # A new connection: its server certificate is checked before anything is sent on it.
            refused = await check.vet(call.endpoint, timeout)
            if refused is not None:
                return Reply("UNAVAILABLE", details=refusal_details(target.service, call.endpoint, refused))
            timeout = attempt_timeout(call, clock(), call.per_try_timeout)
            if timeout is not None and timeout <= 0:
                return Reply("DEADLINE_EXCEEDED", details="deadline exceeded while connecting",
                             local=LocalReason.DEADLINE)
        metadata: tuple[tuple[str, Any], ...] | None = None
        if t.metadata or call.metadata or call.attempt > 1:
            metadata = (*t.metadata, *call.metadata)
            if call.attempt > 1:
                metadata = (*metadata, (ATTEMPT_HEADER, str(call.attempt)))
        if t.kind != UNARY:
            return _open_stream(call, t, pool, timeout, metadata)
        try:
            if t.info is not None and call.endpoint is not None:
                mc = pool.multicallable(call.endpoint, UNARY, t.info)
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


def _open_stream(call: Call, t: Transport, pool: EndpointPool, timeout: float | None, metadata: Any) -> Reply:
    """Open the stream and answer at once: OK with the stream, and `ended`, its final status to come."""
    assert t.info is not None and call.endpoint is not None
    mc = pool.multicallable(call.endpoint, t.kind, t.info)
    rpc = mc(call.request, timeout=timeout, metadata=metadata, credentials=t.credentials,
             wait_for_ready=t.wait_for_ready)
    # A stream is never retried: the caller may be reading it already (grpc.aio cannot swap the call).
    call.committed = True
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[Reply] = loop.create_future()

    async def settle() -> None:
        code = await final_code(rpc)
        details = "" if code in ("OK", "CANCELLED") else await _details(rpc)
        if not ended.done():
            ended.set_result(Reply(code, details=details))

    rpc.add_done_callback(lambda _: loop.create_task(settle()))
    t.answered = rpc
    return Reply("OK", value=rpc, ended=ended)


async def final_code(rpc: Any) -> str:
    """The final status name of a finished (or failed) streaming call."""
    try:
        code = await rpc.code()
    except asyncio.CancelledError:
        return "CANCELLED"
    return str(code.name)


async def _details(rpc: Any) -> str:
    try:
        return str(await rpc.details() or "")
    except asyncio.CancelledError:
        return ""


class Invoker:
    """Calls of one target through its policy stack (one stack per method, built on first use)."""

    def __init__(self, target: InvokeTarget) -> None:
        self._target = target
        # Per method (as grpc hands it over, often bytes): its path, message types and stack.
        self._methods: dict[Any, tuple[str, MethodInfo | None, Handler]] = {}

    def reset(self) -> None:
        """Forget every method's stack (the target's policy changed): each is asked for again on its
        next call. The dict is replaced, not cleared, so the per-call path stays one `get`; a call
        that already holds its stack finishes with it."""
        self._methods = {}

    def _method(self, raw: Any) -> tuple[str, MethodInfo | None, Handler]:
        m = self._methods.get(raw)
        if m is None:
            path = raw.decode() if isinstance(raw, bytes) else str(raw)
            m = self._methods[raw] = (path, method_info(path), self._target.stack_for(path))
        return m

    def prepare(self, paths: Sequence[str], endpoints: Sequence[str]) -> None:
        """Build each method's stack, and the callables of its unary calls on `endpoints`, before its first
        call (MeshClient.warm): then a first call costs what a later one does."""
        for path in paths:
            _, info, _ = self._method(path)
            if info is not None and not (info.client_streaming or info.server_streaming):
                for endpoint in endpoints:
                    self._target.pool.multicallable(endpoint, UNARY, info)

    async def unary(self, method: Any, request: Any, timeout: float | None, metadata: Any,
                    credentials: grpc.CallCredentials | None, wait_for_ready: bool | None,
                    compression: grpc.Compression | None = None, continuation: Callable[..., Any] | None = None,
                    details: ClientCallDetails | None = None, codec: MethodInfo | None = None) -> tuple[Any, Any]:
        """One unary call: (response, the attempt's call object that answered). Raises the call's error.
        `continuation`/`details` are grpc.aio's, for methods that are not protobuf (sent on the front
        channel's single endpoint); `codec`: the method with the caller's own (de)serializers."""
        path, info, stack = self._method(method)
        if codec is not None:
            info = codec
        transport = Transport(UNARY, info, pairs(metadata), wait_for_ready, continuation, details, credentials,
                              compression)
        call = Call(self._target.service, path, request, None, timeout, transport=transport)
        reply = await stack(call)
        if reply.ok:
            return reply.value, transport.answered
        if reply.local:
            # Refused without touching the network (breaker open, limits, no endpoints): yield to the
            # loop once, as a failed RPC always does, so a caller retrying in a loop cannot starve it
            # (and with it the probe that would close the breaker).
            await asyncio.sleep(0)
        raise error_for(self._target.service, path, reply, call.attempt)

    async def stream(self, kind: str, method: Any, request: Any, timeout: float | None, metadata: Any,
                     credentials: grpc.CallCredentials | None, wait_for_ready: bool | None) -> Any:
        """Open a streaming call through the stack; its grpc.aio call, or the error that refused it
        locally. Its outcome is recorded when it ends."""
        path, info, stack = self._method(method)
        transport = Transport(kind, info, pairs(metadata), wait_for_ready, credentials=credentials)
        reply = await stack(Call(self._target.service, path, request, timeout=timeout, transport=transport))
        if reply.ended is None and not reply.ok:
            raise error_for(self._target.service, path, reply)
        return reply.value
