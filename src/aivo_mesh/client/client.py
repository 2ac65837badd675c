"""MeshClient: mTLS channels to mesh services, with the policy stack on every call.

    config = MeshConfig(service_name="learner-svc", ca_cert_path=..., client_cert_path=...,
                        client_key_path=...)
    mesh_client = MeshClient(config)
    async with mesh_client.get_channel("auth-svc") as channel:     # or: await mesh_client.get_channel(...)
        reply = await AuthServiceStub(channel).ValidateToken(req)   # deadline, retries, breaker, balancing
    reply = await mesh_client.call_with_retry(service_name="auth-svc", method_name="ValidateToken",
                                              request=req, timeout=2.0)
    await mesh_client.close()

`MeshClient(config, metrics=prometheus_client.REGISTRY)` records the client's metrics (calls, retries,
breakers, ejections; docs/telemetry.md) in the registry the service already exposes.

Per target service the client keeps one `Target` (policy state + one channel per endpoint); see
client/target.py. Our own certificate files are watched: when they change (`meshctl certs rotate`)
new calls go out on channels with the new identity while in-flight calls finish on the old ones.
`apply_policies(mesh)` applies an edited mesh's policies the same way: new calls use them, calls in
flight finish under the old ones, and what did not change keeps its state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Generator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from aivo_mesh.client.config import MeshConfig
from aivo_mesh.errors import MeshError
from aivo_mesh.policy.core import Clock, Layer, monotonic
from aivo_mesh.policy.events import NOOP, Listeners, PolicyListener

# Importing this module loads grpc and the policy layers only: what a MeshClient needs besides (mesh.yaml's
# model, the certificates' parser, the targets' channels and health checks, telemetry when it is on) is
# imported when a client is made or a target first used, so that `from aivo_mesh import MeshClient` costs
# little more than `import grpc` (benchmarks/bench_startup.py; tests/test_layering.py keeps it so).
if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from aivo_mesh.client.target import Target
    from aivo_mesh.config.model import MeshSpec, ServiceSpec
    from aivo_mesh.config.resolve import RoutePolicy, ServicePolicy
    from aivo_mesh.discovery.snapshot import SnapshotStore
    from aivo_mesh.pki import Identity, PeerPolicy
    from aivo_mesh.policy.stack import Routes
    from aivo_mesh.telemetry.metrics import MeshMetrics
    from aivo_mesh.xds.policies import TargetConfig

log = logging.getLogger(__name__)

# A target's endpoint addresses, and the version of those that are not of the service's own (canary).
Endpoints = tuple[list[str], dict[str, str]]


class UnknownService(MeshError):
    """The target is neither in mesh.yaml nor given explicit endpoints."""


class ChannelHandle:
    """What `get_channel` returns: awaitable (-> channel) and an async context manager.

    The channel is pooled: leaving the `async with` block does not close it; `MeshClient.close` does.
    """

    def __init__(self, client: MeshClient, service: str) -> None:
        self._client = client
        self._service = service

    def __await__(self) -> Generator[Any, None, grpc.aio.Channel]:
        return self._client.channel(self._service).__await__()

    async def __aenter__(self) -> grpc.aio.Channel:
        return await self._client.channel(self._service)

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None


class MeshClient:
    def __init__(
        self,
        config: MeshConfig,
        *,
        listeners: Sequence[PolicyListener] = (),
        outer_layers: Sequence[Layer] = (),
        discovery: SnapshotStore | None = None,
        health_checks: bool = True,
        reload_interval: float | None = 5.0,
        drain_seconds: float | None = None,
        clock: Clock = monotonic,
        rng: random.Random | None = None,
        metrics: MeshMetrics | CollectorRegistry | None = None,
    ) -> None:
        """`metrics`: where this client's Prometheus metrics go: a registry to expose them in
        (`prometheus_client.REGISTRY` for the one the service already serves; see
        MeshMetrics.exposed_in) or a MeshMetrics. None: no metrics (a listener may still record them)."""
        from aivo_mesh.client.channel import channel_credentials
        from aivo_mesh.pki import PeerPolicy, load_identity
        from aivo_mesh.tls import warn_if_not_enforced

        self.config = config
        self.mesh: MeshSpec = config.mesh_spec()
        # Load and check our own identity now: a bad key or cert, or another identity's, fails here,
        # naming the file.
        name = config.service_name
        known = name in self.mesh.service_names or name in self.mesh.mesh.clients
        self._expect_spiffe_id = self.mesh.spiffe_id(name) if known else None
        self.identity: Identity = load_identity(
            config.client_cert_path, config.client_key_path, config.ca_cert_path,
            expect_spiffe_id=self._expect_spiffe_id, roles=("client",))
        # A proxy next to us does mTLS (and retries): Envoy's outbound listener, or Linkerd's proxy.
        self.sidecar = config.sidecar_outbound is not None or config.plaintext_peers
        # mesh.yaml's `sidecar.outbound_tls`: our leg to that listener is mTLS too, under our own identity,
        # and the listener answers with our own certificate (the sidecar is us on the wire).
        self._outbound_tls = (config.sidecar_outbound is not None and name in self.mesh.service_names
                              and self.mesh.service(name).sidecar.outbound_tls)
        self._credentials = channel_credentials(self.identity) if self._mtls else None
        # What servers' certificates must be (pki/peer.py); replaced whole by `set_peer_policy`.
        self.peer_policy = PeerPolicy.from_mesh(self.mesh)
        if not self.sidecar:
            warn_if_not_enforced("MeshClient")
        self.metrics: MeshMetrics | None = None
        if metrics is not None:  # prometheus_client only when metrics are on
            from aivo_mesh.telemetry.metrics import MeshMetrics, MetricsListener

            self.metrics = MeshMetrics.resolve(metrics)
            assert self.metrics is not None
            listeners = (MetricsListener(self.metrics), *listeners)
        # No listeners: the NOOP one lets the stack skip its reporting entirely (hot path).
        self.listener: PolicyListener = Listeners(*listeners) if listeners else NOOP
        self._outer = tuple(outer_layers)
        self._discovery = discovery
        self._health_checks = health_checks and not self.sidecar
        self._reload_interval = reload_interval
        self._drain = drain_seconds
        self._clock = clock
        self._rng = rng
        self._targets: dict[str, Target] = {}
        # What a control plane sent, per peer (apply_control_plane): it wins over mesh.yaml.
        self._from_control_plane: dict[str, TargetConfig] = {}
        self._closed = False
        self._watcher: asyncio.Task[None] | None = None
        self.reloads = 0

    @property
    def _mtls(self) -> bool:
        """Whether our channels carry our certificate: to the peers, or to a sidecar that asks for it."""
        return not self.sidecar or self._outbound_tls

    # -- public API ---------------------------------------------------------------------------
    def get_channel(self, service: str) -> ChannelHandle:
        return ChannelHandle(self, service)

    async def channel(self, service: str) -> grpc.aio.Channel:
        """The pooled MeshChannel to `service` (also what demo services use to call peers)."""
        return self.target(service).channel

    async def call_with_retry(self, service_name: str, method_name: str, request: Any,
                              timeout: float | None = None, metadata: Sequence[tuple[str, str]] = ()) -> Any:
        """One unary call through the full policy stack, by service and method name.

        `method_name` is `Authenticate` or `/aivo.auth.v1.AuthService/Authenticate`. Failures raise
        grpc.aio.AioRpcError: the server's own, or a LocalRpcError subclass (CircuitOpenError,
        OverloadedError, DeadlineExceededError) for what the client decided itself.
        """
        from aivo_mesh.client.invoke import method_info
        from aivo_mesh.client.methods import method_path

        target = self.target(service_name)
        path = method_path(target.grpc_service, method_name)
        info = method_info(path)
        if info is None:
            raise MeshError(f"{path}: unknown method (is its generated *_pb2 module imported?)")
        value, _ = await target.invoker.unary(path, request, timeout, metadata, None, None)
        return value

    async def wait_ready(self, service: str, timeout: float | None = None) -> None:
        """Wait until some endpoint of `service` is connected (bounded by connection_timeout)."""
        await self.target(service).wait_ready(timeout or self.config.connection_timeout)

    async def warm(self, services: Iterable[str] | None = None, timeout: float | None = None) -> dict[str, list[str]]:
        """Open and handshake the channels to `services` before the first call needs them (as Envoy warms
        its clusters before its listeners serve), so that a first call costs what the next one does.

        `services`: by default the peers mesh.yaml lets this client's service call (none for an identity
        that is not a service). Each endpoint's channel connects and its server's certificate is checked
        against the peer policy. Waits `timeout` (default: connection_timeout) at most, for all of them
        together: a peer that is down does not hold the caller longer, and its channel keeps trying in
        the background. Per service, its endpoints that are READY; call it on the client's event loop.
        """
        from aivo_mesh.config.resolve import callable_peers

        if services is None:
            own = self.config.service_name
            services = callable_peers(self.mesh, own) if own in self.mesh.service_names else ()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.config.connection_timeout if timeout is None else timeout)
        names = list(dict.fromkeys(services))
        ready = await asyncio.gather(*(self.target(s).warm(deadline) for s in names))
        return dict(zip(names, ready, strict=True))

    def bare_channel(self, service: str, endpoint: str | None = None, *, reconnect: bool = False) -> grpc.aio.Channel:
        """A channel straight to one endpoint, outside the policy stack: for probes (health checks,
        test tools) that must neither trip nor be refused by the breaker. `reconnect`: if that channel is
        in reconnect back-off (TRANSIENT_FAILURE, where every call fails at once until its timer runs out),
        a new one, so a probe hears the peer as it is now (one that came up since answers)."""
        target = self.target(service)
        if endpoint is None:
            if not target.policy.balancer.endpoints:
                raise MeshError(f"{service}: no endpoints (discovery lists none)")
            endpoint = target.policy.balancer.endpoints[0]
        channel = target.pool.channel(endpoint)
        if reconnect and channel.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            target.pool.discard(endpoint)
            channel = target.pool.channel(endpoint)
        return channel

    def set_peer_policy(self, policy: PeerPolicy) -> None:
        """What servers' certificates must be from now on (a changed revocation list or pin set): every
        connection is checked again before its next call."""
        self.peer_policy = policy
        for t in self._targets.values():
            if t.server_check is not None:
                t.server_check.set_policy(policy)

    def apply_policies(self, mesh: MeshSpec) -> dict[str, set[str]]:
        """Apply `mesh`'s policies (an edited mesh.yaml, or what a control plane sends) to every target,
        and make later targets from it. Per target service: the names of the parts replaced
        (policy.stack.PARTS, and "endpoints" when mesh.yaml's endpoint list changed where the target
        takes its endpoints from it), empty when nothing changed.

        New calls use the new policy at once; calls in flight finish under the one they started with.
        Parts that did not change keep their state (an open breaker stays open, a budget keeps its
        window, endpoints their ejections). Our identity and the peer policy are not changed here
        (`set_peer_policy`). A target whose service `mesh` no longer defines keeps its policy.
        Call it on the client's event loop: the targets' state is not shared across threads.
        """
        self.mesh = mesh
        changed: dict[str, set[str]] = {}
        for service, target in list(self._targets.items()):
            try:
                policy, routes = self._policies(service)
            except UnknownService:
                log.warning("%s is not in the new mesh: its calls keep the policy they had", service)
                continue
            parts = target.update(policy, routes)
            endpoints = self._static_endpoints(service)
            if endpoints is not None and not target.has_endpoints(*endpoints):
                target.set_endpoints(*endpoints)
                parts.add("endpoints")
            target.pool.drain_seconds = self._drain_for(service)
            changed[service] = parts
            log.debug("policy update for %s: %s", service, ", ".join(sorted(parts)) or "nothing changed")
        return changed

    def apply_control_plane(self, targets: Mapping[str, TargetConfig]) -> dict[str, set[str]]:
        """What the control plane sent (`xds.policies.decode_config`): each peer's policy, routes and
        endpoints, for its target now and for any target made later; a peer it says nothing of keeps
        mesh.yaml's. As `apply_policies`: new calls use it at once, calls in flight finish under theirs,
        what did not change keeps its state. Endpoints: the healthy ones (none healthy: none, as Envoy
        sends nothing to an unhealthy host), unless a sidecar carries the calls. Per peer: the parts
        replaced. Call it on the client's event loop."""
        self._from_control_plane = dict(targets)
        changed: dict[str, set[str]] = {}
        for service, target in list(self._targets.items()):
            found = self._from_control_plane.get(service)
            if found is None:
                continue
            parts = target.update(found.policy, found.routes)
            endpoints = self._control_plane_endpoints(service)
            if endpoints is not None and not target.has_endpoints(*endpoints):
                target.set_endpoints(*endpoints)
                parts.add("endpoints")
            changed[service] = parts
            log.debug("control plane update for %s: %s", service, ", ".join(sorted(parts)) or "nothing changed")
        return changed

    def _control_plane_endpoints(self, service: str) -> Endpoints | None:
        from aivo_mesh.discovery.snapshot import VERSION

        found = self._from_control_plane.get(service)
        if found is None or self.sidecar or service in self.config.endpoints:
            return None
        healthy = [e for e in found.endpoints if e.healthy]
        return [e.address for e in healthy], {e.address: e.metadata[VERSION] for e in healthy if VERSION in e.metadata}

    def targets(self) -> dict[str, Target]:
        return dict(self._targets)

    async def close(self) -> None:
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        targets, self._targets = list(self._targets.values()), {}
        await asyncio.gather(*(t.close() for t in targets), return_exceptions=True)

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- targets ------------------------------------------------------------------------------
    def endpoints(self, service: str) -> list[str]:
        if self.config.sidecar_outbound is not None:
            self._spec(service)  # still only mesh services
            return [self.config.sidecar_outbound]
        if service in self.config.endpoints:
            return list(self.config.endpoints[service])
        spec = self._spec(service)
        return list(spec.endpoint_addresses) or [f"{spec.host}:{spec.port}"]

    def _spec(self, service: str) -> ServiceSpec:
        try:
            return self.mesh.service(service)
        except KeyError:
            raise UnknownService(f"unknown service {service!r}: mesh.yaml defines "
                                 f"{list(self.mesh.service_names)}") from None

    def target(self, service: str) -> Target:
        if self._closed:
            raise MeshError("MeshClient is closed")
        t = self._targets.get(service)
        if t is None:
            t = self._targets[service] = self._new_target(service)
        if not t.started:
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # no running loop yet: background work starts on first use inside one
                return t
            t.start(self._discovery, self._health_checks)
            self._ensure_watcher()
        return t

    def _policies(self, service: str) -> tuple[ServicePolicy, Routes]:
        """`service`'s effective policy and routes in the current mesh (UnknownService if it has none)."""
        from aivo_mesh.config.resolve import route_policies, service_policy

        self._spec(service)
        found = self._from_control_plane.get(service)
        if found is not None:
            return found.policy, found.routes
        policy = service_policy(self.mesh, service)
        if service in self.config.endpoints and service not in self.mesh.service_names:
            return policy, self._default_routes(service)
        return policy, route_policies(self.mesh, service)

    def _drain_for(self, service: str) -> float:
        """How long a retired channel (discovery, rotation) stays open: unless told otherwise, until the
        longest call it may carry is over, so a 30 s stream is not cut by a 30 s drain."""
        from aivo_mesh.client.endpoints import DEFAULT_DRAIN_SECONDS
        from aivo_mesh.config.resolve import longest_timeout

        if self._drain is not None:
            return self._drain
        if service in self.mesh.service_names:
            return max(DEFAULT_DRAIN_SECONDS, longest_timeout(self.mesh, service) + 1.0)
        return DEFAULT_DRAIN_SECONDS

    def _static_endpoints(self, service: str) -> Endpoints | None:
        """mesh.yaml's endpoints of `service` with their versions when the target takes its endpoints from
        there (not from discovery, the configuration's `endpoints` or a sidecar), else None."""
        if (self._discovery is not None or self.config.sidecar_outbound is not None
                or service in self.config.endpoints or service in self._from_control_plane):
            return None
        return self.endpoints(service), dict(self._spec(service).endpoint_versions)

    def _new_target(self, service: str) -> Target:
        from aivo_mesh.client.channel import channel_options
        from aivo_mesh.client.endpoints import EndpointPool
        from aivo_mesh.client.server_check import ServerCheck
        from aivo_mesh.client.target import Target

        spec = self._spec(service)
        if self.metrics is not None:  # its breaker (closed) and ejection gauges from the first call
            self.metrics.declare_target(service)
        policy, routes = self._policies(service)
        # Through a TLS sidecar, the server to verify is the sidecar: our own service name (a DNS SAN of
        # our certificate). Its routes pick the peer from the path and rewrite the authority.
        options = channel_options(self.mesh.keepalive, self.config.service_name if self._outbound_tls else spec.name)
        pool = EndpointPool(spec.name, self._credentials, options, drain_seconds=self._drain_for(service))
        endpoints: Endpoints = (self.endpoints(service), {})
        if (static := self._static_endpoints(service)) is not None:
            endpoints = static
        if self._discovery is not None and (snap := self._discovery.get(service)) is not None:
            endpoints = list(snap.addresses), snap.versions
        if (from_control_plane := self._control_plane_endpoints(service)) is not None:
            endpoints = from_control_plane
        max_retries = 0 if self.sidecar else self.config.max_retries
        check = None
        if self._credentials is not None:
            expect = self.mesh.spiffe_id(service) if service in self.mesh.service_names else None
            if self._outbound_tls:
                expect = self._expect_spiffe_id
            check = ServerCheck(service, expect, self.peer_policy, self.listener, pool.channel, pool.discard)
        # Through a sidecar (or Linkerd's proxy) the proxy splits a canary's calls: its one endpoint has no version.
        return Target(policy, routes, pool, server_check=check, endpoints=endpoints[0], versions=endpoints[1],
                      max_retries=max_retries, clock=self._clock, listener=self.listener, outer=self._outer,
                      options=options, credentials=self._credentials, rng=self._rng, split=not self.sidecar)

    def _default_routes(self, service: str) -> Routes:
        from aivo_mesh.config.resolve import RoutePolicy, service_policy

        timeout = self.config.request_timeout
        retry = service_policy(self.mesh, service).retry  # of this mesh: a later one comes with an update

        def route(method: str) -> RoutePolicy:
            return RoutePolicy(service, pattern=method, match=None, timeout=timeout, retry=retry,
                               idempotent=False, streaming=False)

        return route

    # -- certificate hot reload ---------------------------------------------------------------
    def _ensure_watcher(self) -> None:
        if self._watcher is None and self._reload_interval:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_identity(),
                                                                   name="mesh-client-cert-watch")

    async def _watch_identity(self) -> None:
        assert self._reload_interval is not None
        while True:
            await asyncio.sleep(self._reload_interval)
            self.check_identity()

    def check_identity(self) -> bool:
        """Reload our certificate if its files changed; True when new channels were built.
        A half-written or bad rotation is skipped (logged) and the old identity stays in use."""
        from aivo_mesh.client.channel import channel_credentials
        from aivo_mesh.pki import Identity, load_identity

        paths = (self.config.client_cert_path, self.config.client_key_path, self.config.ca_cert_path)
        try:
            if Identity.signature_of(*paths) == self.identity.mtime_signature():
                return False
            identity = load_identity(*paths, expect_spiffe_id=self._expect_spiffe_id, roles=("client",))
        except (MeshError, OSError) as exc:
            log.warning("client certificate reload skipped: %s", exc)
            return False
        self.identity = identity
        if not self._mtls:
            return True  # the sidecar holds the mesh identity on the wire; nothing to rebuild
        self._credentials = channel_credentials(identity)
        for t in self._targets.values():
            t.pool.rebuild(self._credentials)
        self.reloads += 1
        log.info("client certificate reloaded", extra={"serial": f"{identity.serial:x}"})
        return True
