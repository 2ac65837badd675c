"""MeshServer: a grpc.aio server that only speaks mTLS 1.3 to mesh identities.

    server = MeshServer.for_service(mesh, "auth-svc", certs=CertLayout(Path("certs")))
    auth_pb2_grpc.add_AuthServiceServicer_to_server(MyAuth(), server.grpc_server)
    await server.start()            # binds, then reports SERVING over grpc.health.v1
    await server.stop(grace=5.0)    # NOT_SERVING, stop accepting, drain in-flight calls

Certificates are loaded and checked before the port is bound; a bad file raises PkiError naming it.
Callers' certificates are checked against the mesh's peer policy (pki/peer.py) before any handler runs.
Plaintext exists only when asked for explicitly (`insecure=True`, `meshctl serve --insecure`).

Refused connections (opt-in, what `meshctl serve` does): grpc closes a refused TLS handshake without
telling Python. With `on_refused` (e.g. `runtime.handshakes.RefusalLog(service, metrics)`) the server
reports each one, with its reason and peer: handshakes refused by grpc core when the process called
`runtime.handshakes.capture_handshakes()` before importing grpc, and TLS 1.2 connections (refused per
call, reported once per connection) in any case.
`metrics=prometheus_client.REGISTRY` records the server's calls (and its certificate's expiry) in the
registry the service already exposes (MeshMetrics.exposed_in; a MeshMetrics is taken as it is).
`unix_socket=PATH` listens on that Unix domain socket instead of host:port and narrows it to 0600 (the
local sidecar plane: only the mesh's user can reach the app; runtime/sockets.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from aivo_mesh.config.model import MeshSpec
from aivo_mesh.config.resolve import FaultPolicy, ScopedRateLimit, fault_policies, inbound_rate_limits
from aivo_mesh.errors import MeshError
from aivo_mesh.eventloop import loop_name
from aivo_mesh.pki import CertLayout, Identity
from aivo_mesh.pki.peer import PeerPolicy
from aivo_mesh.policy.bind import fault_rules
from aivo_mesh.policy.events import ServerCallObserver
from aivo_mesh.policy.fault import Fault, FaultInjector
from aivo_mesh.runtime.handshakes import Handshake, PeerOnce, RefusalListener, current_capture, peer_address
from aivo_mesh.scheduling import policy_name
from aivo_mesh.server.authz import Authorizer, Rule, tls_version
from aivo_mesh.server.credentials import ReloadingServerCredentials
from aivo_mesh.server.interceptors import REQUIRED_TLS, Denied, GuardedServer, MeshServerInterceptor
from aivo_mesh.server.ratelimit import InboundRateLimits
from aivo_mesh.tls import warn_if_not_enforced

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from aivo_mesh.telemetry.metrics import MeshMetrics

log = logging.getLogger(__name__)

SOCKET_MODE = 0o600  # a Unix socket listener: its owner only

# Clients reconnect (and so re-handshake with rotated certificates) at least this often.
MAX_CONNECTION_AGE_MS = 5 * 60 * 1000
MAX_CONNECTION_AGE_GRACE_MS = 30 * 1000


class MeshServer:
    def __init__(
        self,
        mesh: MeshSpec,
        service: str,
        *,
        cert: Path | None = None,
        key: Path | None = None,
        ca: Path | None = None,
        host: str | None = None,
        port: int | None = None,
        insecure: bool = False,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        observers: Sequence[ServerCallObserver] = (),
        on_identity: Callable[[Identity], None] | None = None,
        options: Sequence[tuple[str, object]] = (),
        on_refused: RefusalListener | None = None,
        unix_socket: str | Path | None = None,
        metrics: MeshMetrics | CollectorRegistry | None = None,
        max_connection_age_ms: int = MAX_CONNECTION_AGE_MS,
        max_connection_age_grace_ms: int = MAX_CONNECTION_AGE_GRACE_MS,
    ) -> None:
        from aivo_mesh.telemetry.metrics import MeshMetrics, ServerMetricsObserver  # it imports this package

        spec = mesh.service(service)
        self.metrics = MeshMetrics.resolve(metrics)
        if self.metrics is not None:
            observers = (*observers, ServerMetricsObserver(self.metrics))
            on_identity = _and_expiry(on_identity, self.metrics, service)
        self.mesh = mesh
        self.service = service
        self.host = host if host is not None else spec.host
        self.port = spec.port if port is None else port
        self.unix_socket = str(unix_socket) if unix_socket is not None else None
        self.insecure = insecure
        self.credentials: ReloadingServerCredentials | None = None
        if not insecure:
            warn_if_not_enforced("MeshServer")
            if cert is None or key is None or ca is None:
                raise MeshError(f"{service}: mTLS needs cert, key and ca paths (or insecure=True)")
            self.credentials = ReloadingServerCredentials(cert, key, ca, on_reload=on_identity,
                                                          expect_spiffe_id=mesh.spiffe_id(service))
            if on_identity is not None:
                on_identity(self.credentials.identity)
        self.authorizer = Authorizer(mesh, service)
        # mesh.yaml's rate limits of this service, per caller identity. A plaintext server has no callers'
        # identities, and runs behind a sidecar that limits (render/envoy.py): it limits nothing itself.
        self.rate_limits = None if insecure else InboundRateLimits(inbound_rate_limits(mesh, service))
        self.guard = MeshServerInterceptor(None if insecure else self.authorizer, service=service,
                                           require_tls=not insecure, observers=observers,
                                           peer_policy=PeerPolicy.from_mesh(mesh), rate_limits=self.rate_limits)
        self.fault_policies: tuple[FaultPolicy, ...] = ()
        self.set_faults(fault_policies(mesh, service))
        if self.metrics is not None:
            self.guard.on_fault = self._count_fault
        self.on_refused = None if insecure else on_refused
        self._first_refusal = PeerOnce()
        if self.on_refused is not None:
            self.guard.on_denied = self._denied
        server_options = [
            ("grpc.max_connection_age_ms", max_connection_age_ms),
            ("grpc.max_connection_age_grace_ms", max_connection_age_grace_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.so_reuseport", 0),
            *options,
        ]
        # The guard wraps handlers as they are registered (no interceptor per call); with interceptors of
        # the caller's own it is the first interceptor, so it runs before theirs.
        self.grpc_server: grpc.aio.Server = (
            grpc.aio.server(interceptors=[self.guard, *interceptors], options=server_options) if interceptors
            else GuardedServer(self.guard, options=server_options))
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        self._service_names: list[str] = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        self.bound_port: int | None = None
        self._started = False
        self._status = health_pb2.HealthCheckResponse.NOT_SERVING

    @classmethod
    def for_service(
        cls, mesh: MeshSpec, service: str, certs: CertLayout, **kwargs: object
    ) -> MeshServer:
        cert, key = certs.identity_paths(service)
        return cls(mesh, service, cert=cert, key=key, ca=certs.ca_cert, **kwargs)  # type: ignore[arg-type]

    def set_peer_policy(self, policy: PeerPolicy) -> None:
        """What callers' certificates must be from the next call on (a changed revocation list or pin
        set in mesh.yaml); calls in flight were admitted under the old one."""
        self.guard.peer_policy = policy

    def update_authorizer(self, mesh: MeshSpec) -> bool:
        """`mesh`'s allow rules for this service decide calls from the next one on (an edited mesh.yaml,
        or what a control plane sends); True if they differ from those in force. Calls in flight keep
        the decision they were admitted with, and no decision made under the old rules is reused.
        KeyError (the rules in force stay) if `mesh` does not define this service. The service's rate
        limits follow `mesh` too (`set_rate_limits`)."""
        changed = self._set_authorizer(Authorizer(mesh, self.service))
        return self.set_rate_limits(inbound_rate_limits(mesh, self.service)) or changed

    def set_allow_rules(self, rules: Iterable[tuple[frozenset[str], tuple[str, ...]]]) -> bool:
        """Allow rules as a control plane sends them (`xds.policies.decode_config`: callers' SPIFFE IDs or
        "*", and methods), deciding calls from the next one on, as `update_authorizer`."""
        return self._set_authorizer(Authorizer(self.mesh, self.service, [Rule(c, m) for c, m in rules]))

    def set_rate_limits(self, limits: Sequence[ScopedRateLimit]) -> bool:
        """Rate limits (`config.resolve.inbound_rate_limits`, from an edited mesh.yaml or a control plane)
        in force from the next call on; True if they differ. A bucket whose size is unchanged keeps its
        tokens, so a push that leaves a limit alone does not refill it. Ignored on a plaintext server."""
        if self.rate_limits is None or not self.rate_limits.set(limits):
            return False
        log.info("%s: rate limits updated", self.service)
        return True

    def _set_authorizer(self, authorizer: Authorizer) -> bool:
        if authorizer.same_rules(self.authorizer):
            return False
        self.authorizer = authorizer
        self.guard.set_authorizer(authorizer)
        log.info("%s: allow rules updated", self.service)
        return True

    def set_faults(self, policies: Sequence[FaultPolicy]) -> bool:
        """The faults to inject from the next call on (`config.resolve.fault_policies`, or as a control plane
        sends them: `xds.policies.decode_config`); True if they differ from those in force. A plaintext
        server (`insecure`) injects none: the sidecar in front of it does."""
        policies = tuple(policies)
        if policies == self.fault_policies:
            return False
        self.fault_policies = policies
        # No injector at all while nothing can fault: the guard then skips the lookup on every call. Nor on a
        # plaintext server: it sits behind a sidecar, whose fault filter already injects them (as it authorizes).
        active = not self.insecure and any(p.active for p in policies)
        self.guard.faults = FaultInjector(fault_rules(policies)) if active else None
        log.info("%s: fault injection %s", self.service, "on" if self.guard.faults is not None else "off")
        return True

    def _count_fault(self, method: str, fault: Fault) -> None:
        assert self.metrics is not None
        self.metrics.observe_fault(self.service, method, delay=fault.delay > 0, abort=fault.abort is not None)

    def add_service_name(self, full_name: str) -> None:
        """Declare a gRPC service hosted here (for health status and reflection)."""
        self._service_names.append(full_name)

    @property
    def address(self) -> str:
        """What the server listens on: ``host:port`` or ``unix:<path>``."""
        return f"unix:{self.unix_socket}" if self.unix_socket is not None else f"{self.host}:{self.port}"

    async def start(self) -> int:
        address = self.address
        if self.credentials is not None:
            bound = self.grpc_server.add_secure_port(address, self.credentials.credentials())
        else:
            log.warning("%s: serving PLAINTEXT on %s (--insecure): only for local debugging, or behind a "
                        "sidecar proxy that does mTLS (Envoy, Linkerd)", self.service, address)
            bound = self.grpc_server.add_insecure_port(address)
        if bound == 0:
            raise MeshError(f"{self.service}: cannot bind {address} (port in use?)")
        if self.unix_socket is not None:
            # grpc creates the socket under the umask; its folder (0700) keeps others out until now.
            os.chmod(self.unix_socket, SOCKET_MODE)
        self.bound_port = int(bound)
        reflection.enable_server_reflection(
            [*self._service_names, reflection.SERVICE_NAME], self.grpc_server)
        if isinstance(self.grpc_server, GuardedServer):
            self.grpc_server.guard_unknown_methods()  # the last generic handler: after reflection's
        await self.grpc_server.start()
        self._started = True
        for name in ["", *self._service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._status = health_pb2.HealthCheckResponse.SERVING
        if self.on_refused is not None and (capture := current_capture()) is not None:
            capture.subscribe(self.on_refused, port=int(bound))
        log.info("%s serving on %s (%s, %s loop, %s scheduling)", self.service,
                 address if self.unix_socket is not None else f"{self.host}:{bound}",
                 "plaintext" if self.insecure else "mTLS", loop_name(), policy_name())
        return int(bound)

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, stop accepting, let in-flight calls finish within `grace` seconds."""
        if not self._started:
            return
        self._started = False
        self._status = health_pb2.HealthCheckResponse.NOT_SERVING
        if self.on_refused is not None and (capture := current_capture()) is not None:
            capture.unsubscribe(self.on_refused)
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(grace)

    def _denied(self, context: grpc.aio.ServicerContext, denied: Denied) -> None:
        """A call refused by the guard: a connection that negotiated TLS 1.2 is a refused connection
        (grpcio cannot refuse it at the handshake), reported once per peer address."""
        version = tls_version(context.auth_context())
        if version == REQUIRED_TLS or self.on_refused is None:
            return
        peer = peer_address(context.peer() or "")
        if self._first_refusal(peer):
            port = self.bound_port or self.port
            self.on_refused(Handshake("tls_version", "server", peer, f"{self.host}:{port}",
                                      f"{denied.details}; every call on it is refused with UNAUTHENTICATED"))

    def health_status(self) -> int:
        """The overall health this server reports (grpc.health.v1 ServingStatus value)."""
        return int(self._status)

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()

    async def __aenter__(self) -> MeshServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.shield(self.stop())


def _and_expiry(on_identity: Callable[[Identity], None] | None, metrics: MeshMetrics,
                service: str) -> Callable[[Identity], None]:
    """`on_identity`, after publishing each (re)loaded identity's expiry in `metrics`."""
    def both(identity: Identity) -> None:
        metrics.set_certificate_expiry(service, identity)
        if on_identity is not None:
            on_identity(identity)
    return both
