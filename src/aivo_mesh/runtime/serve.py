"""One demo service in its own process, assembled from mesh.yaml:

    MeshServer   mTLS 1.3, authorization, health, reflection, telemetry observers
    MeshClient   the service's own identity, for calls to its peers (full policy stack)
    the app      the service's servicer (services/)
    admin        /stats /clusters /circuit_breakers /metrics /ready on 127.0.0.1:<admin_port>
    Consul       self-registration with a TLS gRPC health check, when an agent address is given
    discovery    where the client finds its peers: mesh.yaml (static, the default), DNS or Consul

`ServeOptions` says how (ports, plane, discovery, certificate files); `ServiceProcess` assembles and starts
the parts and tears down, in reverse, exactly those it started (an AsyncExitStack); `serve_service` runs one
until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

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
from aivo_mesh.telemetry.admin import AdminServer, Request, Response, error_response, is_loopback, json_response
from aivo_mesh.telemetry.process import ProcessTelemetry

if TYPE_CHECKING:
    from aivo_mesh.discovery.facade import DnsOptions
    from aivo_mesh.xds.node import ProxylessNode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """How one service process runs; the defaults serve mesh.yaml's ports over mTLS.

    `discovery` is where the client finds its peers: "static" (mesh.yaml), "dns" (`dns` options) or
    "consul" (the agent at `consul_discovery`, passing instances only). The server starts once every
    peer has a first snapshot, or after `discovery_timeout` (then, until a peer's snapshot arrives, its
    mesh.yaml endpoints are used); later snapshots apply without failing in-flight calls. With `mesh_file`,
    a change of its `certificates` block (a revocation) applies to both the server and the client live.

    With `handshake_log` the server logs and counts the TLS connections it refuses (see
    runtime.handshakes: the refused handshakes need `capture_handshakes()` first, as `meshctl serve`).
    """

    insecure: bool = False  # PLAINTEXT, no mTLS (local debugging, or behind a sidecar)
    port: int | None = None  # instead of mesh.yaml's port
    admin_port: int | None = None  # instead of mesh.yaml's admin_port
    unix_socket: str | None = None  # listen there (0600) instead of host:port, as the local sidecar plane does
    consul: str | None = None  # register in the Consul agent at this HOST:PORT while serving
    discovery: Literal["static", "dns", "consul"] = "static"
    consul_discovery: str | None = None
    dns: DnsOptions | None = None
    discovery_timeout: float = 5.0
    sidecar_outbound: str | None = None  # sidecar plane: call peers through this local Envoy listener
    plaintext_peers: bool = False  # transparent-proxy plane: the pod's proxy adds mTLS
    # The control plane's ADS address: routes, policies, endpoints and allow rules live from it (xds/node.py).
    control_plane: str | None = None
    # Certificate files overriding the service's own in its CertLayout (CLIENT_CERT_PATH, CLIENT_KEY_PATH,
    # CA_CERT_PATH), each on its own; `identity_files` resolves them.
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    mesh_file: Path | None = None
    handshake_log: bool = True
    otel_service_name: str | None = None  # this process's name in its spans (OTEL_SERVICE_NAME), when not the service's
    grace: float = 5.0  # seconds in-flight calls get to finish on shutdown
    # Before serving, open and handshake the client's channels to the peers it may call, waiting this long
    # at most (0: not at all), so its first calls do not pay for connecting (MeshClient.warm). Proxyless
    # only: a sidecar warms its own clusters.
    warm_timeout: float = 2.0

    def identity_files(self, certs: CertLayout, name: str) -> tuple[Path, Path, Path]:
        """The certificate, key and CA bundle the service serves and calls with: each override, else its
        file in `certs`. The one place the overrides are resolved."""
        cert, key = certs.identity_paths(name)
        return self.cert or cert, self.key or key, self.ca or certs.ca_cert


class ServiceProcess:
    """One service's server, client, app, admin endpoint, discovery and Consul registration, as
    `async with ServiceProcess(...)`: entering starts them (a port or socket in use starts nothing),
    leaving stops what was started, in reverse: registration and discovery first, then the listeners
    (in-flight calls get `grace`), then the app, its client and telemetry."""

    def __init__(self, mesh: MeshSpec, name: str, certs: CertLayout, data_dir: Path,
                 options: ServeOptions | None = None) -> None:
        if name not in APPS:
            raise KeyError(f"no demo application for {name!r}; known: {sorted(APPS)}")
        self.options = options = options or ServeOptions()
        if options.unix_socket is not None and options.consul:
            raise StartupError(f"{name}: a service on a Unix socket ({options.unix_socket}) cannot register a "
                               "host:port in Consul; drop --consul or --unix-socket")
        self.mesh = mesh
        self.name = name
        self.certs = certs
        self.data_dir = data_dir
        self.node: ProxylessNode | None = None  # on a control plane (options.control_plane)
        self.client: MeshClient | None = None  # the service's client to its peers, once started
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> ServiceProcess:
        try:
            await self._start(self._stack)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._stack.aclose()

    async def _config_dump(self, request: Request) -> Response:
        """What this process holds from the control plane, as Envoy's `/config_dump` shows it."""
        if self.node is None:
            return error_response(404, f"{self.name} does not take its configuration from a control plane "
                                       "(its configuration is mesh.yaml: `meshctl config show`)")
        return json_response(200, self.node.subscription.config_dump())

    async def _follow_control_plane(self, stack: AsyncExitStack, client: MeshClient, server: MeshServer,
                                    cert: Path, key: Path, ca: Path) -> None:
        """One ADS stream for the process: its peers' policies, routes and endpoints go to the client,
        its own allow rules to the server. Waits (bounded) for the first configuration, as for discovery."""
        from aivo_mesh.xds.node import ProxylessNode, apply_to

        assert self.options.control_plane is not None
        node = ProxylessNode(self.mesh, self.name, self.options.control_plane, cert=cert, key=key, ca=ca,
                             apply=apply_to(client, server))
        self.node = node
        node.start()
        stack.push_async_callback(node.stop)
        if await node.wait_applied(self.options.discovery_timeout):
            log.info("%s takes its configuration from the control plane at %s", self.name,
                     self.options.control_plane)
        else:
            log.warning("%s: no configuration from the control plane at %s within %.0fs (%s); until it comes, "
                        "mesh.yaml's is in force", self.name, self.options.control_plane,
                        self.options.discovery_timeout, node.subscription.last_error or "no answer")

    async def _warm(self, client: MeshClient, peers: Sequence[str]) -> None:
        """The client's channels to `peers`, connected and their servers checked, within warm_timeout: a peer
        that is down is logged, and its calls connect when they come."""
        started = time.monotonic()
        ready = await client.warm(peers, self.options.warm_timeout)
        took = (time.monotonic() - started) * 1000
        if cold := [p for p, endpoints in ready.items() if not endpoints]:
            log.warning("%s: no connection to %s within %.1fs; serving without them (their first calls connect)",
                        self.name, ", ".join(cold), self.options.warm_timeout)
        warm = [p for p, endpoints in ready.items() if endpoints]
        if warm:
            log.info("%s: channels to %s ready in %.0f ms", self.name, ", ".join(warm), took)

    async def _start(self, stack: AsyncExitStack) -> None:
        mesh, name, opts = self.mesh, self.name, self.options
        spec = mesh.service(name)
        telemetry = ProcessTelemetry.for_service(mesh, name, otel_service_name=opts.otel_service_name)
        stack.push_async_callback(telemetry.close)
        peers = callable_peers(mesh, name)  # the services mesh.yaml lets this one call
        for peer in peers:  # breaker and ejection gauges exist before the first call
            telemetry.metrics.declare_target(peer)
        if telemetry.tracing is not None:
            telemetry.tracing.install_global()  # application spans via opentelemetry.trace.get_tracer
        common = {"port": opts.port, "observers": telemetry.observers(), "unix_socket": opts.unix_socket}
        cert, key, ca = opts.identity_files(self.certs, name)
        if opts.insecure:
            server = MeshServer(mesh, name, insecure=True, **common)  # type: ignore[arg-type]
        else:
            server = MeshServer(mesh, name, cert=cert, key=key, ca=ca,
                                on_identity=lambda ident: telemetry.metrics.set_certificate_expiry(name, ident),
                                on_refused=RefusalLog(name, telemetry.metrics) if opts.handshake_log else None,
                                **common)  # type: ignore[arg-type]
        config = MeshConfig(service_name=name, ca_cert_path=ca, client_cert_path=cert, client_key_path=key,
                            mesh=mesh, sidecar_outbound=opts.sidecar_outbound, plaintext_peers=opts.plaintext_peers)
        watch = None
        if opts.discovery != "static":  # imported here: dnspython and the Consul client only when used
            from aivo_mesh.discovery.consul import DEFAULT_ADDRESS, ConsulDiscovery
            from aivo_mesh.discovery.facade import build_discovery

            consul_source = (ConsulDiscovery(opts.consul_discovery or DEFAULT_ADDRESS) if opts.discovery == "consul"
                             else None)
            watch = build_discovery(mesh, opts.discovery, services=peers, dns=opts.dns, consul=consul_source)
        client = MeshClient(config, listeners=telemetry.listeners(), outer_layers=telemetry.client_layers(),
                            discovery=watch.store if watch is not None else None)
        self.client = client
        stack.push_async_callback(client.close)
        app = APPS[name](server.grpc_server, ServiceContext(name=name, state_dir=self.data_dir, peers=client))
        stack.push_async_callback(app.close)
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
                            port=opts.admin_port if opts.admin_port is not None else (spec.admin_port or 0),
                            allow_remote=not is_loopback(host),
                            extra_routes={("GET", "/config_dump"): self._config_dump})

        async def stop_listening() -> None:
            # The server drains first, while the admin endpoint still answers (/ready says NOT_READY).
            await server.stop(opts.grace)
            await admin.stop()

        stack.push_async_callback(stop_listening)  # both are no-ops unless started
        grpc_what, admin_what = f"{name} (gRPC)", f"{name} (admin endpoint)"
        # Both before either binds: a port or socket in use starts nothing.
        if opts.unix_socket is not None and (problem := unix_listen_problem(opts.unix_socket, grpc_what)):
            raise StartupError(problem)
        tcp = ([] if opts.unix_socket is not None else [(server.host, server.port, grpc_what)])
        for host_, port_, what in [*tcp, (admin.host, admin.port, admin_what)]:
            if port_ and (problem := listen_problem(host_, port_, what)):
                raise StartupError(problem)
        if watch is not None:
            from aivo_mesh.discovery.facade import DiscoveryNotReady

            stack.push_async_callback(watch.stop)
            # As Envoy warms a cluster before its listeners serve: wait (bounded) for each peer's first
            # snapshot, so early calls do not go to mesh.yaml's endpoints and trip the breaker there.
            await watch.start()
            log.info("%s finds its peers by %s discovery: %r", name, opts.discovery, watch)
            try:
                await watch.wait_ready(timeout=opts.discovery_timeout)
            except DiscoveryNotReady as exc:
                log.warning("%s: %s; until they arrive, calls to those peers use mesh.yaml's endpoints", name, exc)
        if opts.control_plane is not None:  # as discovery: its first configuration before the server serves
            await self._follow_control_plane(stack, client, server, cert, key, ca)
        # As the discovery and the control plane: before SERVING. Behind a sidecar (or Linkerd's proxy) the
        # proxy warms its own clusters, and its listener may come up after us: nothing for us to wait for.
        if opts.warm_timeout > 0 and peers and not client.sidecar:
            await self._warm(client, peers)
        try:
            bound = await server.start()
        except (RuntimeError, MeshError, OSError) as exc:  # taken since the check; grpc says only "Failed to bind"
            problem = (unix_listen_problem(opts.unix_socket, grpc_what) if opts.unix_socket is not None
                       else listen_problem(server.host, server.port, grpc_what))
            raise (StartupError(problem) if problem else exc) from None
        try:
            await admin.start()
        except OSError as exc:
            raise StartupError(listen_problem(admin.host, admin.port, admin_what)
                               or f"cannot listen on {admin.host}:{admin.port} ({admin_what}): "
                                  f"{exc.strerror}") from None
        log.info("%s admin endpoint on %s", name, admin.url)
        if opts.consul:
            from aivo_mesh.discovery.consul_register import BackgroundRegistration, ConsulRegistration

            registration = BackgroundRegistration(ConsulRegistration(opts.consul), mesh, name, address=server.host,
                                                  port=bound, use_tls=not opts.insecure)
            registration.start()
            stack.push_async_callback(registration.close)
        if opts.mesh_file is not None:
            def apply(new: MeshSpec) -> None:
                policy = PeerPolicy.from_mesh(new)
                server.set_peer_policy(policy)
                client.set_peer_policy(policy)

            follower = asyncio.get_running_loop().create_task(follow_certificates(opts.mesh_file, mesh, apply))
            stack.callback(follower.cancel)


async def serve_service(mesh: MeshSpec, name: str, certs: CertLayout, data_dir: Path,
                        options: ServeOptions | None = None, *, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then drain in-flight calls within `options.grace`."""
    process = ServiceProcess(mesh, name, certs, data_dir, options)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with process:
            await stop.wait()
            log.info("%s: draining (grace %.1fs)", name, process.options.grace)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
