"""One target service as a MeshClient sees it: policy state, endpoint channels, the front channel.

    TargetPolicy   breaker, retry budget, concurrency limit, balancer (policy/, no grpc)
    EndpointPool   one mTLS channel per endpoint (client/endpoints.py)
    invoker        every call of every arity through the one stack (client/invoke.py)
    channel        what `get_channel` hands out (client/mesh_channel.py): unary calls enter the
                   invoker directly; streams go through the front channel's interceptors to it
    front channel  carries the interceptors and never connects itself (unless a non-protobuf
                   method falls back to it)
Background tasks (started on first use, stopped by `close`): active gRPC health checks of each
endpoint, and, when a discovery store is given, applying its endpoint snapshots.

`update` applies a new policy while calls run (TargetPolicy.update says what is kept); calls in
flight finish under the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aivo_mesh.client.endpoints import EndpointPool, open_channel
from aivo_mesh.client.interceptors import interceptors
from aivo_mesh.client.invoke import Invoker, make_terminal
from aivo_mesh.client.mesh_channel import MeshChannel
from aivo_mesh.client.methods import service_methods
from aivo_mesh.client.server_check import ServerCheck
from aivo_mesh.config.resolve import ServicePolicy
from aivo_mesh.discovery.snapshot import SnapshotStore
from aivo_mesh.errors import MeshError
from aivo_mesh.policy.core import Clock, Handler, Layer
from aivo_mesh.policy.events import PolicyListener
from aivo_mesh.policy.stack import HEALTH, REBUILDS_STACKS, Routes, TargetPolicy

log = logging.getLogger(__name__)


class Target:
    def __init__(
        self,
        policy: ServicePolicy,
        routes: Routes,
        pool: EndpointPool,
        *,
        server_check: ServerCheck | None = None,
        endpoints: Sequence[str],
        versions: Mapping[str, str] | None = None,
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
        self.policy = TargetPolicy(policy, routes, make_terminal(self), endpoints=endpoints, versions=versions,
                                   max_retries=max_retries, clock=clock, listener=listener, outer=outer,
                                   **policy_kwargs)
        self.invoker = Invoker(self)  # the stub path (both channels) and call_with_retry
        self.front = open_channel(endpoints[0] if endpoints else "127.0.0.1:1", credentials, options,
                                  interceptors(self.invoker))
        self.channel = MeshChannel(self.invoker, self.front, self)
        self.health_interval = policy.health_check.interval
        self.health_timeout = policy.health_check.timeout
        self._tasks: list[asyncio.Task[None]] = []
        self.started = False  # background tasks running (they need the event loop)

    def stack_for(self, method: str) -> Handler:
        return self.policy.stack_for(method)

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

    def update(self, policy: ServicePolicy, routes: Routes) -> set[str]:
        """A new policy for this target; the names of the parts it replaced (policy.stack.PARTS),
        empty when it equals the one in force. The next call of each method gets a stack built from
        the new policy; calls in flight finish with theirs. A new health-check interval applies
        after the current wait."""
        parts = self.policy.update(policy, routes)
        hc = policy.health_check
        if (hc.interval, hc.timeout) != (self.health_interval, self.health_timeout):
            self.health_interval, self.health_timeout = hc.interval, hc.timeout
            parts.add(HEALTH)
        if parts & REBUILDS_STACKS:
            self.invoker.reset()
        return parts

    def set_endpoints(self, endpoints: Sequence[str], versions: Mapping[str, str] | None = None) -> None:
        """Discovery changed the endpoints (or their versions: `versions`, the service's own for one it does
        not name): new calls use the new set, in-flight calls finish."""
        self.policy.set_endpoints(endpoints, versions)
        self.pool.retain(endpoints)

    def has_endpoints(self, endpoints: Sequence[str], versions: Mapping[str, str] | None = None) -> bool:
        """Whether the balancer holds exactly these endpoints with these versions."""
        balancer = self.policy.balancer
        return balancer.endpoints == list(endpoints) and balancer.versions == {
            e: (versions or {}).get(e, balancer.default_version) for e in endpoints}

    async def _follow(self, store: SnapshotStore) -> None:
        version: str | None = None
        while True:
            snap = await store.newer_than(self.service, version)
            version = snap.version
            self.set_endpoints(list(snap.addresses), snap.versions)

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

    async def warm(self, deadline: float) -> list[str]:
        """Connect every endpoint's channel and check its server's certificate (the peer policy) before
        any call needs them, as Envoy warms a cluster; waits until `deadline` (the loop's clock) at most.
        The endpoints that are READY (and vetted), in the balancer's order; the others keep connecting
        in the background, as grpc retries a channel that failed to connect."""
        loop = asyncio.get_running_loop()

        async def one(endpoint: str) -> bool:
            try:
                await asyncio.wait_for(self.pool.channel(endpoint).channel_ready(), deadline - loop.time())
            except TimeoutError:
                return False
            if self.server_check is None:  # plaintext to a local proxy, which checks the peer itself
                return True
            if (await self.server_check.vet(endpoint, max(0.0, deadline - loop.time())) is not None
                    or not self.server_check.vetted.get(endpoint, False)):
                return False
            # One health check on the new connection, its answer left to the health loop: the connection's
            # first stream (HTTP/2 settings and header tables, grpc's first call path) is then behind us
            # (a warm first call: 1.8x the steady p50 without it, 1.2x with it; docs/benchmarks.md), and
            # the server has checked this connection's certificate (its session).
            stub = health_pb2_grpc.HealthStub(self.pool.channel(endpoint))
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.Check(health_pb2.HealthCheckRequest(service=self.grpc_service),
                                 timeout=max(0.001, min(self.health_timeout, deadline - loop.time())))
            return True

        endpoints = list(self.policy.balancer.endpoints)
        ready = [e for e, ok in zip(endpoints, await asyncio.gather(*(one(e) for e in endpoints)), strict=True) if ok]
        self.invoker.prepare(service_methods(self.grpc_service), ready)
        return ready

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
