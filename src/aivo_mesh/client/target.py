"""One target service as a MeshClient sees it: policy state, endpoint channels, the front channel.

    TargetPolicy   breaker, retry budget, concurrency limit, balancer (policy/, no grpc)
    EndpointPool   one mTLS channel per endpoint (client/endpoints.py)
    channel        what `get_channel` hands out (client/mesh_channel.py): unary calls enter the stack
                   directly; streams go on to the front channel
    front channel  carries the interceptors and never connects itself (unless a non-protobuf
                   method falls back to it)
Background tasks (started on first use, stopped by `close`): active gRPC health checks of each
endpoint, and, when a discovery store is given, applying its endpoint snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc.aio import ClientCallDetails
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aivo_mesh.client.endpoints import EndpointPool, open_channel
from aivo_mesh.client.errors import error_for
from aivo_mesh.client.interceptors import UnaryUnaryAdapter, _pairs, final_code, make_unary_terminal, stream_adapters
from aivo_mesh.client.mesh_channel import MeshChannel
from aivo_mesh.client.methods import MethodInfo
from aivo_mesh.client.server_check import ServerCheck, refusal_details
from aivo_mesh.config.resolve import RoutePolicy, ServicePolicy, route_policy
from aivo_mesh.discovery.snapshot import SnapshotStore
from aivo_mesh.errors import MeshError
from aivo_mesh.policy.breaker import REJECTED
from aivo_mesh.policy.classify import Classifier
from aivo_mesh.policy.core import Call, Clock, Layer, Reply
from aivo_mesh.policy.deadline import DEADLINE_PASSED, effective_timeout, inherited_timeout
from aivo_mesh.policy.events import PolicyListener
from aivo_mesh.policy.stack import TargetPolicy

log = logging.getLogger(__name__)

StreamObserver = Callable[[Call], Callable[[str, str, bool], None] | None]


class Target:
    def __init__(
        self,
        policy: ServicePolicy,
        routes: Any,
        pool: EndpointPool,
        *,
        server_check: ServerCheck | None = None,
        endpoints: Sequence[str],
        max_retries: int | None,
        clock: Clock,
        listener: PolicyListener,
        outer: Sequence[Layer],
        options: Sequence[tuple[str, object]],
        credentials: grpc.ChannelCredentials | None,
        **policy_kwargs: Any,
    ) -> None:
        self.service = policy.service.name
        self.grpc_service = policy.service.grpc_service
        self.clock = clock
        self.pool = pool
        self.listener = listener
        self.server_check = server_check  # None: plaintext to a sidecar, which checks the peer itself
        if server_check is not None:
            pool.on_forget = server_check.forget
        self._routes = routes
        self.policy = TargetPolicy(policy, routes, make_unary_terminal(self), endpoints=endpoints,
                                   max_retries=max_retries, clock=clock, listener=listener, outer=outer,
                                   **policy_kwargs)
        self.unary = UnaryUnaryAdapter(self)  # unary calls: the stub path (both channels) and call_with_retry
        self.front = open_channel(endpoints[0] if endpoints else "127.0.0.1:1", credentials, options,
                                  [self.unary, *stream_adapters(self)])
        self.channel = MeshChannel(self)
        self.health_interval = policy.health_check.interval
        self.health_timeout = policy.health_check.timeout
        self._tasks: list[asyncio.Task[None]] = []
        self.started = False  # background tasks running (they need the event loop)
        self._stream_classifiers: dict[str, Classifier] = {}
        # Outer layers that also observe streams (telemetry's tracing): `stream_started(call)` returns
        # the function that ends the observation with (code, details, local), or None.
        self._stream_observers: list[StreamObserver] = [
            o for layer in outer if (o := getattr(layer, "stream_started", None)) is not None]

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, store: SnapshotStore | None, health_checks: bool) -> None:
        loop = asyncio.get_running_loop()
        self.started = True
        if store is not None:
            self._tasks.append(loop.create_task(self._follow(store), name=f"discovery:{self.service}"))
        if health_checks:
            self._tasks.append(loop.create_task(self._health_loop(), name=f"health:{self.service}"))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self.server_check is not None:
            self.server_check.close()
        await self.front.close()
        await self.pool.close()

    def set_endpoints(self, endpoints: Sequence[str]) -> None:
        """Discovery changed the endpoints: new calls use the new set, in-flight calls finish."""
        self.policy.set_endpoints(endpoints)
        self.pool.retain(endpoints)

    async def _follow(self, store: SnapshotStore) -> None:
        version: str | None = None
        while True:
            snap = await store.newer_than(self.service, version)
            version = snap.version
            self.set_endpoints(list(snap.addresses))

    async def _health_loop(self) -> None:
        """Active gRPC health checks per endpoint; failing endpoints are skipped by the balancer."""
        while True:
            await asyncio.gather(*(self._check(ep) for ep in self.policy.balancer.endpoints))
            await asyncio.sleep(self.health_interval)

    async def _check(self, endpoint: str) -> None:
        if self.policy.balancer.state(endpoint) is None:
            return  # discovery removed it since the round began: do not reopen its channel
        stub = health_pb2_grpc.HealthStub(self.pool.channel(endpoint))
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=self.grpc_service),
                                    timeout=self.health_timeout)
            healthy = resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            healthy = False
        if self.policy.balancer.report_check(endpoint, healthy):
            log.info("%s endpoint %s is now %s", self.service, endpoint, "healthy" if healthy else "unhealthy")

    # -- connectivity (MeshClient.wait_ready, MeshChannel) ----------------------------------------
    async def wait_ready(self, timeout: float | None) -> None:
        """Until some endpoint's channel is READY (idle ones are asked to connect). MeshError if
        discovery lists no endpoint, or none connects within `timeout` (None: no bound)."""
        endpoints = self.policy.balancer.endpoints
        if not endpoints:  # discovery may legitimately say "none" (every Consul instance critical)
            raise MeshError(f"{self.service}: no endpoints (discovery lists none)")
        if not await _first_of([self.pool.channel(e).channel_ready() for e in endpoints], timeout):
            raise MeshError(f"{self.service}: no endpoint connected within {timeout:.1f}s")

    def connectivity(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """The endpoints' channel states folded into one, as grpc folds a channel's subchannels:
        READY if any is, else CONNECTING, else TRANSIENT_FAILURE, else IDLE."""
        states = {self.pool.channel(e).get_state(try_to_connect) for e in self.policy.balancer.endpoints}
        for state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.CONNECTING,
                      grpc.ChannelConnectivity.TRANSIENT_FAILURE):
            if state in states:
                return state
        return grpc.ChannelConnectivity.IDLE

    async def wait_for_connectivity_change(self, last: grpc.ChannelConnectivity) -> None:
        """Until `connectivity()` differs from `last`: wakes on any endpoint's state change (or,
        with no endpoints, on discovery's next change, checked every second)."""
        while self.connectivity() == last:
            endpoints = self.policy.balancer.endpoints
            if not endpoints:
                await asyncio.sleep(1.0)
                continue
            channels = [self.pool.channel(e) for e in endpoints]
            await _first_of([ch.wait_for_state_change(ch.get_state()) for ch in channels], 1.0)

    # -- streams ----------------------------------------------------------------------------------
    def _route(self, path: str) -> RoutePolicy:
        r: RoutePolicy = self._routes(path)
        return r

    async def start_stream(self, kind: str, info: MethodInfo, details: ClientCallDetails, request: Any) -> Any:
        """Open a streaming call on a picked endpoint, under the deadline, the breaker and the
        concurrency limit. Outer layers that observe streams (tracing) see it start and end; the
        outcome (final status) is recorded when the stream ends. Runs in grpc.aio's interceptor task
        (a context of its own): stream observers may set context variables here."""
        path = info.path
        policy = self.policy
        route = self._route(path)
        classifier = self._stream_classifiers.get(path)
        if classifier is None:
            classifier = self._stream_classifiers[path] = Classifier.for_route(
                route.retry.retry_on, idempotent=route.idempotent,
                failure_codes=policy.policy.circuit_breaker.failure_codes)
        started = self.clock()
        self.listener.call_started(self.service, path)
        call = Call(self.service, path, request, timeout=details.timeout)
        finishers = [f for observe in self._stream_observers if (f := observe(call)) is not None]

        def end_locally(code: str, details: str) -> None:  # the stream never reached a server
            for f in finishers:
                f(code, details, True)
            self.listener.call_finished(self.service, path, code, self.clock() - started, 1, True)

        def reject(reply: Reply) -> BaseException:
            end_locally(reply.code, reply.details)
            return error_for(self.service, path, reply)

        # Streams default to the route timeout only when mesh.yaml gives one for them.
        timeout = effective_timeout(details.timeout, route.timeout, inherited_timeout(self.clock))
        if timeout is not None and timeout <= 0:  # e.g. the inbound call's deadline has passed
            raise reject(DEADLINE_PASSED)
        ticket = policy.breaker.admit()
        if ticket == REJECTED:
            self.listener.breaker_rejected(self.service, path)
            raise reject(policy.breaker.rejection())
        if not policy.limit.try_acquire():
            policy.breaker.release(ticket)
            self.listener.limit_rejected(self.service, path, "max_requests")
            raise reject(Reply("RESOURCE_EXHAUSTED", details=f"{self.service}: max_requests reached", local=True))
        ep = policy.balancer.pick()
        if ep is None:
            policy.limit.release()
            policy.breaker.release(ticket)
            raise reject(Reply("UNAVAILABLE", details=f"no endpoints for {self.service}", local=True))
        if self.server_check is not None and not self.server_check.vetted.get(ep.address):
            refused = await self.server_check.vet(ep.address, timeout)
            if refused is not None:
                policy.limit.release()
                policy.breaker.release(ticket)
                raise reject(Reply("UNAVAILABLE", details=refusal_details(self.service, ep.address, refused)))
        # Streams are never retried: always attempt 1, no x-mesh-attempt header.
        metadata = (*_pairs(details.metadata), *call.metadata) or None
        mc = self.pool.multicallable(ep.address, kind, path, info.serialize, info.deserialize)
        try:
            rpc = mc(request, timeout=timeout, metadata=metadata, credentials=details.credentials,
                     wait_for_ready=details.wait_for_ready)
        except BaseException:  # grpc refused to start it (the caller's error): nothing to count
            policy.limit.release()
            policy.breaker.release(ticket)
            end_locally("UNKNOWN", "the call could not be started")
            raise

        def done(_: Any) -> None:
            asyncio.get_running_loop().create_task(finish())

        async def finish() -> None:
            code = await final_code(rpc)
            policy.limit.release()
            outcome = classifier.of(code)
            policy.breaker.record(ticket, outcome, code)
            policy.balancer.record(ep, outcome)
            self.listener.call_finished(self.service, path, code, self.clock() - started, 1, False)
            if finishers:
                text = "" if code in ("OK", "CANCELLED") else await _details(rpc)
                for f in finishers:
                    f(code, text, False)

        rpc.add_done_callback(done)
        return rpc

    # -- introspection for the admin endpoint ----------------------------------------------------
    def cluster(self) -> dict[str, Any]:
        snap = self.policy.snapshot()
        states = self.pool.states()
        for ep in snap["endpoints"]:  # type: ignore[attr-defined]
            ep["connectivity"] = states.get(ep["endpoint"], "IDLE")
        snap["observed_at"] = time.time()
        return snap


async def _first_of(aws: Sequence[Awaitable[Any]], timeout: float | None) -> bool:
    """Wait until one of `aws` finishes (True) or `timeout` passes (False); cancel the rest."""
    waits = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    return bool(done)


async def _details(rpc: Any) -> str:
    try:
        return str(await rpc.details() or "")
    except asyncio.CancelledError:
        return ""


def route_lookup(mesh: Any, service: str) -> Any:
    def lookup(method: str) -> RoutePolicy:
        return route_policy(mesh, service, method)

    return lookup
