"""A fault-injecting mesh server for client-policy tests (real grpc.aio, real mTLS on 127.0.0.1).

`FaultyAuth` implements aivo.auth.v1.AuthService and aivo.events.v1.EventCollectorService.ListEvents
with behaviour set per test through a `FaultPlan`: fail a fraction of calls, fail the first k,
delay, abort with a given status (optionally with retry pushback), or stream one message then fail.
`TcpProxy` sits in front of a server and can drop every connection, like a crashing peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field

import grpc

from aivo_mesh.policy.core import ATTEMPT_HEADER
from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc, events_pb2, events_pb2_grpc


@dataclass
class FaultPlan:
    fail_first: int = 0  # the first k calls fail with `status`
    fail_fraction: float = 0.0  # then this fraction fails
    status: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    delay: float = 0.0
    slow_calls: int | None = None  # only the first n unary calls are delayed (None: every call)
    pushback_ms: str | None = None  # sent as grpc-retry-pushback-ms on failures
    stream_then_fail: bool = False
    hold: asyncio.Event | None = None  # streams wait for it after their first message
    seed: int = 7
    calls: int = 0
    attempts_seen: list[int] = field(default_factory=list)
    metadata_seen: list[dict[str, str]] = field(default_factory=list)  # each unary call's invocation metadata
    failures: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def should_fail(self) -> bool:
        self.calls += 1
        if self.calls <= self.fail_first:
            return True
        return self.fail_fraction > 0 and self._rng.random() < self.fail_fraction


def _attempt(context: grpc.aio.ServicerContext) -> int:
    for k, v in context.invocation_metadata() or ():
        if k == ATTEMPT_HEADER:
            return int(v)
    return 1  # the header is sent on retries only


class FaultyAuth(auth_pb2_grpc.AuthServiceServicer, events_pb2_grpc.EventCollectorServiceServicer):
    def __init__(self, plan: FaultPlan, name: str = "") -> None:
        self.plan = plan
        self.name = name

    async def _maybe_fail(self, context: grpc.aio.ServicerContext) -> None:
        self.plan.attempts_seen.append(_attempt(context))
        self.plan.metadata_seen.append({k: v for k, v in context.invocation_metadata() or ()})
        if self.plan.delay and (self.plan.slow_calls is None or len(self.plan.attempts_seen) <= self.plan.slow_calls):
            await asyncio.sleep(self.plan.delay)
        if self.plan.should_fail():
            self.plan.failures += 1
            if self.plan.pushback_ms is not None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", self.plan.pushback_ms),))
            await context.abort(self.plan.status, f"injected {self.plan.status.name} by {self.name}")
        # Which server and attempt answered, readable by the caller from the call's metadata.
        await context.send_initial_metadata((("x-served-by", self.name),))
        context.set_trailing_metadata((("x-answered-attempt", str(self.plan.attempts_seen[-1])),))

    async def Authenticate(self, request, context):
        await self._maybe_fail(context)
        return auth_pb2.AuthenticateResponse(token="t", subject=self.name)

    async def ValidateToken(self, request, context):
        await self._maybe_fail(context)
        return auth_pb2.ValidateTokenResponse(valid=True, subject=self.name)

    async def ListEvents(self, request, context):
        self.plan.attempts_seen.append(_attempt(context))
        self.plan.metadata_seen.append({k: v for k, v in context.invocation_metadata() or ()})
        self.plan.calls += 1
        yield events_pb2.Event(event_id="e1", learner_id=self.name)
        if self.plan.hold is not None:
            await self.plan.hold.wait()
        if self.plan.stream_then_fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "injected mid-stream failure")
        yield events_pb2.Event(event_id="e2", learner_id=self.name)


class TcpProxy:
    """A loopback TCP forwarder whose connections can all be dropped at once."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.refuse = False

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.close()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_w}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            with contextlib.suppress(Exception):
                w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        self._writers -= {writer, up_w}

    def drop_all(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        self.drop_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
