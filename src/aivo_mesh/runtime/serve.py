"""One demo service in its own process, assembled from mesh.yaml:

    MeshServer   mTLS 1.3, authorization, health, reflection, telemetry observers
    MeshClient   the service's own identity, for calls to its peers (full policy stack)
    the app      the service's servicer (services/)
    admin        /stats /clusters /circuit_breakers /metrics /ready on 127.0.0.1:<admin_port>
    Consul       self-registration with a TLS gRPC health check, when an agent address is given
    discovery    where the client finds its peers: mesh.yaml (static, the default), DNS or Consul
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from aivo_mesh.client import MeshClient, MeshConfig
from aivo_mesh.config.model import MeshSpec
from aivo_mesh.config.resolve import callable_peers
from aivo_mesh.errors import MeshError, StartupError
from aivo_mesh.pki import CertLayout, PeerPolicy
from aivo_mesh.runtime.admin_source import MeshAdminSource
from aivo_mesh.runtime.handshakes import RefusalLog
from aivo_mesh.runtime.local import listen_problem
from aivo_mesh.runtime.mesh_watch import follow_certificates
from aivo_mesh.runtime.sockets import unix_listen_problem
from aivo_mesh.server import MeshServer
from aivo_mesh.services import APPS
from aivo_mesh.services.base import ServiceContext
from aivo_mesh.services.protos import SERVICE_DESCRIPTORS
from aivo_mesh.telemetry.admin import AdminServer, is_loopback
from aivo_mesh.telemetry.process import ProcessTelemetry

if TYPE_CHECKING:
    from aivo_mesh.discovery.consul_register import BackgroundRegistration
    from aivo_mesh.discovery.facade import DnsOptions

log = logging.getLogger(__name__)


async def serve_service(
    mesh: MeshSpec,
    name: str,
    certs: CertLayout,
    data_dir: Path,
    *,
    insecure: bool = False,
    port: int | None = None,
    admin_port: int | None = None,
    consul: str | None = None,
    grace: float = 5.0,
    stop: asyncio.Event | None = None,
    sidecar_outbound: str | None = None,
    cert_paths: tuple[Path, Path, Path] | None = None,
    plaintext_peers: bool = False,
    discovery: str = "static",
    consul_discovery: str | None = None,
    dns: DnsOptions | None = None,
    discovery_timeout: float = 5.0,
    mesh_file: Path | None = None,
    handshake_log: bool = True,
    unix_socket: str | None = None,
    otel_service_name: str | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then drain in-flight calls within `grace`.

    `discovery` is where the client finds its peers: "static" (mesh.yaml), "dns" (`dns` options) or
    "consul" (the agent at `consul_discovery`, passing instances only). The server starts once every
    peer has a first snapshot, or after `discovery_timeout` (then, until a peer's snapshot arrives, its
    mesh.yaml endpoints are used); later snapshots apply without failing in-flight calls. With `mesh_file`,
    a change of its `certificates` block (a revocation) applies to both the server and the client live.

    With `handshake_log` the server logs and counts the TLS connections it refuses (see
    runtime.handshakes: the refused handshakes need `capture_handshakes()` first, as `meshctl serve`).

    `unix_socket`: listen there (0600) instead of host:port, as the local sidecar plane does.
    `otel_service_name` (OTEL_SERVICE_NAME): this process's name in its spans, when not `name`."""
    if name not in APPS:
        raise KeyError(f"no demo application for {name!r}; known: {sorted(APPS)}")
    if unix_socket is not None and consul:
        raise StartupError(f"{name}: a service on a Unix socket ({unix_socket}) cannot register a host:port "
                           "in Consul; drop --consul or --unix-socket")
    spec = mesh.service(name)
    telemetry = ProcessTelemetry.for_service(mesh, name, otel_service_name=otel_service_name)
    peers = callable_peers(mesh, name)  # the services mesh.yaml lets this one call
    for peer in peers:  # breaker and ejection gauges exist before the first call
        telemetry.metrics.declare_target(peer)
    if telemetry.tracing is not None:
        telemetry.tracing.install_global()  # application spans via opentelemetry.trace.get_tracer
    common = {"port": port, "observers": telemetry.observers(), "unix_socket": unix_socket}
    cert, key = certs.identity_paths(name)
    cert, key, ca = cert_paths or (cert, key, certs.ca_cert)
    if insecure:
        server = MeshServer(mesh, name, insecure=True, **common)  # type: ignore[arg-type]
    else:
        server = MeshServer(mesh, name, cert=cert, key=key, ca=ca,
                            on_identity=lambda ident: telemetry.metrics.set_certificate_expiry(name, ident),
                            on_refused=RefusalLog(name, telemetry.metrics) if handshake_log else None,
                            **common)  # type: ignore[arg-type]
    config = MeshConfig(service_name=name, ca_cert_path=ca, client_cert_path=cert, client_key_path=key, mesh=mesh,
                        sidecar_outbound=sidecar_outbound, plaintext_peers=plaintext_peers)
    watch = None
    if discovery != "static":  # imported here: dnspython and the Consul client only when used
        from aivo_mesh.discovery.consul import DEFAULT_ADDRESS, ConsulDiscovery
        from aivo_mesh.discovery.facade import DiscoveryNotReady, build_discovery

        consul_source = ConsulDiscovery(consul_discovery or DEFAULT_ADDRESS) if discovery == "consul" else None
        watch = build_discovery(mesh, discovery, services=peers, dns=dns, consul=consul_source)
    client = MeshClient(config, listeners=telemetry.listeners(), outer_layers=telemetry.client_layers(),
                        discovery=watch.store if watch is not None else None)
    app = APPS[name](server.grpc_server, ServiceContext(name=name, state_dir=data_dir, peers=client))
    server.add_service_name(SERVICE_DESCRIPTORS[name])
    # The admin endpoint binds loopback unless mesh.yaml or METRICS_HOST names another address (e.g.
    # 0.0.0.0 in a pod, so Prometheus can scrape it): an explicit setting is the operator's consent,
    # said out loud since the endpoint is unauthenticated.
    host = mesh.observability.metrics.host
    if not is_loopback(host):
        log.warning("%s: the admin endpoint listens on %s (observability.metrics.host or METRICS_HOST), beyond "
                    "loopback: it is unauthenticated and can reset circuit breakers; keep it off untrusted "
                    "networks", name, host)
    admin = AdminServer(MeshAdminSource(client, server), telemetry.metrics, host=host,
                        port=admin_port if admin_port is not None else (spec.admin_port or 0),
                        allow_remote=not is_loopback(host))
    registration: BackgroundRegistration | None = None
    follower: asyncio.Task[None] | None = None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    listeners = ((server.host, server.port, f"{name} (gRPC)"), (admin.host, admin.port, f"{name} (admin endpoint)"))
    try:
        # Both before either binds: a port or socket in use starts nothing.
        if unix_socket is not None and (problem := unix_listen_problem(unix_socket, listeners[0][2])):
            raise StartupError(problem)
        for host_, port_, what in (listeners[1:] if unix_socket is not None else listeners):
            if port_ and (problem := listen_problem(host_, port_, what)):
                raise StartupError(problem)
        if watch is not None:
            # As Envoy warms a cluster before its listeners serve: wait (bounded) for each peer's first
            # snapshot, so early calls do not go to mesh.yaml's endpoints and trip the breaker there.
            await watch.start()
            log.info("%s finds its peers by %s discovery: %r", name, discovery, watch)
            try:
                await watch.wait_ready(timeout=discovery_timeout)
            except DiscoveryNotReady as exc:
                log.warning("%s: %s; until they arrive, calls to those peers use mesh.yaml's endpoints", name, exc)
        try:
            bound = await server.start()
        except (RuntimeError, MeshError, OSError) as exc:  # taken since the check; grpc says only "Failed to bind"
            problem = (unix_listen_problem(unix_socket, listeners[0][2]) if unix_socket is not None
                       else listen_problem(server.host, server.port, listeners[0][2]))
            raise (StartupError(problem) if problem else exc) from None
        try:
            await admin.start()
        except OSError as exc:
            raise StartupError(listen_problem(admin.host, admin.port, listeners[1][2])
                               or f"cannot listen on {admin.host}:{admin.port} ({listeners[1][2]}): "
                                  f"{exc.strerror}") from None
        log.info("%s admin endpoint on %s", name, admin.url)
        if consul:
            from aivo_mesh.discovery.consul_register import BackgroundRegistration, ConsulRegistration

            registration = BackgroundRegistration(ConsulRegistration(consul), mesh, name, address=server.host,
                                                  port=bound, use_tls=not insecure)
            registration.start()
        if mesh_file is not None:
            def apply(new: MeshSpec) -> None:
                policy = PeerPolicy.from_mesh(new)
                server.set_peer_policy(policy)
                client.set_peer_policy(policy)

            follower = asyncio.get_running_loop().create_task(follow_certificates(mesh_file, mesh, apply))
        await stop.wait()
        log.info("%s: draining (grace %.1fs)", name, grace)
    finally:
        if follower is not None:
            follower.cancel()
        if watch is not None:
            await watch.stop()
        if registration is not None:
            await registration.close()
        await server.stop(grace)
        await admin.stop()
        await app.close()
        await client.close()
        await telemetry.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

