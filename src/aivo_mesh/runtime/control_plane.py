"""The local mesh's control plane process: mesh.yaml and the certificates in, snapshots out over ADS.

    inputs     the state dir's effective mesh.yaml; the certificates the peer policy vetted (the keys the
               sidecars trust travel as `mesh_ca`, never a private key); endpoints from mesh.yaml
    snapshots  one node group per service and plane: its sidecar's (xds/resources.py) and its gRPC
               processes' (`<service>/proxyless`, xds/proxyless.py, cut from the sidecar's), set in the cache
               (xds/cache.py) only when consistent; content-hash versions, so a restarted control plane
               causes no churn
    ADS        xds/server.py on mTLS 1.3 with the control plane's own identity; nodes must be who their
               certificate says
    admin      loopback HTTP: GET /xds/status (per node: connected, ACKed versions, last NACK),
               GET /xds/config (the snapshot versions per group), POST /apply (a mesh.yaml: checked with
               the same errors as `config validate`, pushed, answered once every connected node ACKed or
               NACKed, or the bound passed)

`meshctl up` runs it under the supervisor (`meshctl control-plane`, hidden); `meshctl apply` talks to
its admin endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from opentelemetry.trace import StatusCode

from aivo_mesh.config.loader import load_mesh, parse_mesh
from aivo_mesh.config.model import MeshSpec, to_data
from aivo_mesh.discovery import Discovery, DiscoveryNotReady, Endpoint
from aivo_mesh.discovery.static import static_endpoints
from aivo_mesh.errors import ConfigError
from aivo_mesh.fsutil import write_atomic
from aivo_mesh.pki import PeerPolicy
from aivo_mesh.runtime.mesh_watch import file_changes
from aivo_mesh.runtime.sidecar_certs import SidecarCertificates, for_local_mesh
from aivo_mesh.runtime.state import StateDir
from aivo_mesh.server.credentials import ReloadingServerCredentials
from aivo_mesh.telemetry.admin import AdminServer, HttpError, Request, Response, error_response, json_response
from aivo_mesh.telemetry.metrics import MeshMetrics
from aivo_mesh.telemetry.tracing import Tracing
from aivo_mesh.telemetry.xds_metrics import XdsMetrics
from aivo_mesh.xds.cache import InconsistentSnapshot, SnapshotCache, type_name
from aivo_mesh.xds.groups import PROXYLESS, group_name, node_group
from aivo_mesh.xds.proxyless import is_proxyless, proxyless_snapshot
from aivo_mesh.xds.resources import ProfileFor, Trust, mesh_snapshots
from aivo_mesh.xds.server import AdsServer

log = logging.getLogger(__name__)

APPLY_TIMEOUT = 10.0  # seconds apply waits for every connected node's ACK or NACK
DISCOVERY_SETTLE = 0.05  # seconds: a burst of discovery changes (a deploy) is one push
DISCOVERY_READY = 5.0  # seconds start waits for discovery's first answer per service
CERT_POLL = 1.0

class ControlPlane:
    def __init__(self, state: StateDir, profile_for: ProfileFor, *, port: int | None = None,
                 admin_port: int | None = None, tracing: Tracing | None = None,
                 discovery: Discovery | None = None, direct: Collection[str] = ()) -> None:
        """Ports default to mesh.yaml's control_plane addresses; 0 takes a free one (tests). With
        `tracing`, every build and every apply is a trace (build, then each node's ACK or NACK). With
        `discovery` (DNS, Consul), a peer's instances are what it finds, health included; without, or
        for a service it has nothing on yet, mesh.yaml's `endpoints`, else the peer's own sidecar, or for
        a service in `direct` (one without a sidecar: the proxyless plane) its own address."""
        self.state = state
        self.profile_for = profile_for
        self.mesh = load_mesh(state.mesh_file)
        self.cache = SnapshotCache()
        self.vetting: SidecarCertificates = for_local_mesh(state.certs, self.mesh, state.root / "envoy")
        self.metrics = MeshMetrics()
        self.events = XdsMetrics(self.metrics)
        self.tracing = tracing
        self.discovery = discovery
        self.direct = frozenset(direct)
        self._proxyless: set[str] = set(self.direct)  # services whose proxyless group is built
        self.ads = AdsServer(self.cache, self._group_of, PeerPolicy.from_mesh(self.mesh), events=self.events)
        (self.host, mesh_port), (self.admin_host, mesh_admin) = (self.mesh.control_plane.host_port,
                                                                 self.mesh.control_plane.admin_host_port)
        self.port = mesh_port if port is None else port
        self.admin_port = mesh_admin if admin_port is None else admin_port
        self.built_at = 0.0
        self.build_seconds = 0.0
        self._server: grpc.aio.Server | None = None
        self._admin: AdminServer | None = None
        self._discovered = asyncio.Event()
        self._followers: list[asyncio.Task[None]] = []

    # -- node groups ------------------------------------------------------------------------------------
    def _group_of(self, node: Any) -> str | None:
        """The service whose SPIFFE ID the node claims (AdsServer has checked it against the certificate),
        on the plane its metadata names: the sidecar's group, or the service's gRPC processes'."""
        for name in self.mesh.service_names:
            if node.id == self.mesh.spiffe_id(name):
                if not is_proxyless(node):
                    return name
                if name not in self._proxyless:
                    self._add_proxyless(name)
                return group_name(name)
        return None

    def _add_proxyless(self, name: str) -> None:
        """From now on, build `name`'s proxyless group too (its first gRPC process connected): cut from the
        sidecar snapshot in the cache, as every rebuild will."""
        self._proxyless.add(name)
        sidecar = self.cache.get(name)
        if sidecar is None:
            return  # no build yet: the first one makes it
        try:
            self.cache.set(group_name(name), proxyless_snapshot(self.mesh, name, sidecar))
        except InconsistentSnapshot as exc:
            log.error("%s", exc)

    def endpoints(self, mesh: MeshSpec) -> dict[str, tuple[Endpoint, ...]]:
        """Each service's instances as its callers' sidecars should see them (see __init__)."""
        out: dict[str, tuple[Endpoint, ...]] = {}
        for svc in mesh.services:
            found = self.discovery.snapshot(svc.name) if self.discovery is not None else None
            if found is not None:
                out[svc.name] = found.endpoints
            elif svc.endpoints:
                out[svc.name] = static_endpoints(svc)
            elif svc.name in self.direct:
                out[svc.name] = (Endpoint(svc.host, svc.port),)
        return out

    def rebuild(self, mesh: MeshSpec, reason: str = "mesh.yaml") -> dict[str, bool]:
        """Every node group's snapshot from `mesh`: all checked before any is published, so a mesh that
        does not build changes nothing. {group: whether its snapshot changed}."""
        with self._span("xds.snapshot.build", reason=reason, services=len(mesh.services)) as span:
            started = time.monotonic()
            try:
                changed = self._build(mesh)
            except BaseException:
                self.events.built(time.monotonic() - started, ok=False)
                raise
            self.build_seconds = time.monotonic() - started
            self.events.built(self.build_seconds, ok=True)
            if span is not None:
                span.set_attribute("xds.changed", sorted(n for n, c in changed.items() if c))
        self.built_at = time.time()
        log.info("snapshots built", extra={"reason": reason, "groups": len(changed),
                                            "changed": sorted(n for n, c in changed.items() if c),
                                            "seconds": round(self.build_seconds, 4)})
        return changed

    def _build(self, mesh: MeshSpec) -> dict[str, bool]:
        self.vetting.set_mesh(mesh)
        self.vetting.refresh()
        bundle = self.vetting.bundle()
        if bundle is None:
            raise ConfigError.single(str(self.state.certs.root), "", "no vetted certificate: the sidecars would "
                                     "trust nothing")
        trust = Trust(bundle, tuple(self.vetting.pins()))
        snapshots = mesh_snapshots(mesh, self.profile_for, trust, self.endpoints(mesh))
        # gRPC's own clients: cut from the same snapshots, so both planes mean the same mesh.yaml. Only for
        # the services that have such clients (the proxyless plane's, and any whose gRPC process has
        # connected): at 1000 services, all of them would double the build.
        snapshots |= {group_name(name): proxyless_snapshot(mesh, name, snapshots[name])
                      for name in sorted(self._proxyless) if name in snapshots}
        changed = {name: self.cache.set(name, snap) for name, snap in snapshots.items()}
        self.mesh = mesh
        self.ads.policy = PeerPolicy.from_mesh(mesh)
        return changed

    @contextlib.contextmanager
    def _span(self, name: str, **attrs: Any) -> Iterator[Any]:
        if self.tracing is None:
            yield None
            return
        with self.tracing.span(name, **{f"xds.{k}": v for k, v in attrs.items()}) as span:
            yield span

    # -- apply ------------------------------------------------------------------------------------------
    def _keep_running_shape(self, new: MeshSpec) -> MeshSpec:
        """The applied mesh with this run's ports and local observability (a live change cannot move a
        listener or the collector); a service added or removed needs a restart, said so."""
        if set(new.service_names) != set(self.mesh.service_names):
            added = sorted(set(new.service_names) - set(self.mesh.service_names))
            gone = sorted(set(self.mesh.service_names) - set(new.service_names))
            raise HttpError(409, f"services added {added or '-'} or removed {gone or '-'}: the processes of a "
                                 "local mesh are planned at `meshctl up`; run `meshctl down` and `meshctl up`")
        services = []
        for svc in new.services:
            old = self.mesh.service(svc.name)
            services.append(svc.model_copy(update={"port": old.port, "local_port": old.local_port,
                                                   "admin_port": old.admin_port, "sidecar": old.sidecar,
                                                   "host": old.host}))
        return new.model_copy(update={"services": tuple(services), "observability": self.mesh.observability,
                                      "control_plane": self.mesh.control_plane})

    async def apply(self, text: str, source: str = "mesh.yaml") -> dict[str, Any]:
        with self._span("xds.apply", source=source) as span:
            mesh = self._keep_running_shape(parse_mesh(text, source))
            changed = self.rebuild(mesh, reason=f"apply {source}")
            # What a restarted control plane (and `meshctl status`) start from.
            write_atomic(self.state.mesh_file, _dump(mesh))
            with self._span("xds.wait_acks", timeout_s=APPLY_TIMEOUT):
                verdicts = await self.ads.wait_settled(APPLY_TIMEOUT)
            nodes = [{"node": self.ads.nodes[key].node_id, "service": self.ads.nodes[key].group,
                      "changed": changed.get(self.ads.nodes[key].group, False), "outcome": verdict}
                     for key, verdict in sorted(verdicts.items())]
            if span is not None:
                for n in nodes:
                    span.add_event("xds.node", {"node": n["node"], "outcome": n["outcome"],
                                                "changed": n["changed"]})
                if any(n["outcome"] != "acked" for n in nodes):
                    span.set_status(StatusCode.ERROR, "a node refused or did not answer")
        # `changed` names services whose configuration changed on their own plane (a service in `direct`
        # has no sidecar: its proxyless group); each node says whether its own group changed.
        return {"changed": sorted(s for s in mesh.service_names
                                  if changed.get(node_group(s, PROXYLESS if s in self.direct else "sidecar"))),
                "nodes": nodes,
                "build_seconds": round(self.build_seconds, 4)}

    # -- serving ----------------------------------------------------------------------------------------
    async def start(self) -> tuple[int, int]:
        if self.discovery is not None:
            loop = asyncio.get_running_loop()

            def note(_service: str, _snapshot: object) -> None:  # any thread (Consul's queries run in threads)
                loop.call_soon_threadsafe(self._discovered.set)

            self.discovery.store.subscribe(note)
            await self.discovery.start()
            try:  # the first snapshots from what discovery knows, not from mesh.yaml's defaults
                await self.discovery.wait_ready(DISCOVERY_READY)
            except DiscoveryNotReady as exc:
                log.warning("%s; those peers keep mesh.yaml's addresses until it finds them", exc)
        self.rebuild(self.mesh)
        identity = self.mesh.control_plane.identity
        cert, key = self.state.certs.identity_paths(identity)
        credentials = ReloadingServerCredentials(cert, key, self.state.certs.ca_cert,
                                                 expect_spiffe_id=self.mesh.spiffe_id(identity))
        self._server = grpc.aio.server(options=[("grpc.keepalive_permit_without_calls", 1),
                                                ("grpc.http2.min_ping_interval_without_data_ms", 10_000)])
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.ads, self._server)
        self.port = self._server.add_secure_port(f"{self.host}:{self.port}", credentials.credentials())
        await self._server.start()
        self._admin = AdminServer(_Source(self), self.metrics, self.admin_host, self.admin_port,
                                  extra_routes=self._routes())
        self.admin_port = await self._admin.start()
        # Certificates (rotations, revocations) and discovery reach the snapshots while it serves.
        loop = asyncio.get_running_loop()
        self._followers = [loop.create_task(self.follow_certificates()), loop.create_task(self.follow_discovery())]
        log.info("control plane serving ADS on %s:%d, admin on %s", self.host, self.port, self._admin.url)
        return self.port, self.admin_port

    async def follow_file(self, path: Path) -> None:
        """`meshctl up --watch`: each saved change of `path` is applied as `meshctl apply` would; a file
        that does not load or build is logged and the mesh keeps its configuration."""
        async for _ in file_changes(path):
            try:
                text = await asyncio.to_thread(path.read_text, encoding="utf-8")
                result = await self.apply(text, str(path))
            except (ConfigError, InconsistentSnapshot) as exc:
                log.warning("%s changed but was not applied; the sidecars keep their configuration: %s", path, exc)
            except HttpError as exc:
                log.warning("%s changed but cannot be applied live: %s", path, exc.message)
            except (OSError, UnicodeDecodeError) as exc:
                log.warning("%s changed but cannot be read: %s", path, exc)
            else:
                refused = [n["node"] for n in result["nodes"] if n["outcome"] != "acked"]
                log.info("applied %s", path, extra={"changed": result["changed"], "not_acked": refused})

    async def follow_discovery(self, settle: float = DISCOVERY_SETTLE) -> None:
        """Each change discovery publishes becomes an EDS push (changes within `settle` seconds are one
        build; a source that publishes the same set again changes nothing: its version is a hash)."""
        while self.discovery is not None:
            await self._discovered.wait()
            await asyncio.sleep(settle)
            self._discovered.clear()
            try:
                self.rebuild(self.mesh, reason="discovery")
            except (ConfigError, InconsistentSnapshot) as exc:
                log.error("discovery changed but the snapshots could not be rebuilt: %s", exc)

    async def follow_certificates(self) -> None:
        """Rotations and revocations reach the sidecars' trust (`mesh_ca`) without a restart."""
        while True:
            await asyncio.sleep(CERT_POLL)
            try:
                if self.vetting.refresh():
                    self.rebuild(self.mesh, reason="certificates")
            except (ConfigError, InconsistentSnapshot, OSError) as exc:
                log.error("certificates changed but the snapshots could not be rebuilt: %s", exc)

    async def stop(self) -> None:
        for task in self._followers:
            task.cancel()
        await asyncio.gather(*self._followers, return_exceptions=True)
        if self.discovery is not None:
            await self.discovery.stop()
        if self._admin is not None:
            await self._admin.stop()
        if self._server is not None:
            await self._server.stop(1.0)

    def _routes(self) -> dict[tuple[str, str], Callable[[Request], Awaitable[Response]]]:
        async def status(_: Request) -> Response:
            return json_response(200, {"nodes": self.ads.status(), "built_at": self.built_at,
                                       "build_seconds": self.build_seconds})

        async def config(_: Request) -> Response:
            return json_response(200, {g: {type_name(t): v for t, v in s.versions.items()} | {"version": s.version}
                                       for g in self.cache.groups() if (s := self.cache.get(g)) is not None})

        async def apply(request: Request) -> Response:
            # The file's name, which its errors give: UTF-8 in the header (`meshctl apply` sends it so).
            source = request.headers.get("x-mesh-file", "mesh.yaml").encode("latin-1").decode("utf-8", "replace")
            try:
                return json_response(200, await self.apply(request.body.decode("utf-8"), source))
            except ConfigError as exc:
                return json_response(400, {"error": "invalid mesh.yaml", "issues": [
                    {"path": i.yaml_path, "message": i.message, "line": i.line} for i in exc.issues],
                    "text": str(exc)})
            except InconsistentSnapshot as exc:
                return json_response(409, {"error": str(exc)})
            except UnicodeDecodeError:
                return error_response(400, "mesh.yaml is not UTF-8")

        return {("GET", "/xds/status"): status, ("GET", "/xds/config"): config, ("POST", "/apply"): apply}


def _dump(mesh: MeshSpec) -> bytes:
    import yaml

    return ("# generated by meshctl: the effective mesh of this local run (last `meshctl apply`)\n"
            + yaml.safe_dump(to_data(mesh), sort_keys=False)).encode()


class _Source:
    """The admin endpoint's required views; a control plane has no upstream clusters or breakers."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    def clusters(self) -> list[dict[str, Any]]:
        return []

    def circuit_breakers(self) -> dict[str, dict[str, Any]]:
        return {}

    def reset_circuit_breaker(self, service: str) -> bool:
        return False

    def ready(self) -> bool:
        return bool(self.cp.cache.groups())

    def identity(self) -> dict[str, Any]:
        return {"control_plane": self.cp.mesh.spiffe_id(self.cp.mesh.control_plane.identity)}


async def run_control_plane(state: StateDir, profile_for: ProfileFor, tracing: Tracing | None = None,
                            watch: Path | None = None, discovery: Discovery | None = None,
                            direct: Collection[str] = ()) -> None:
    """The body of `meshctl control-plane`: serve until SIGTERM/SIGINT; with `watch`, apply each change
    of that mesh.yaml. `direct`: the services without a sidecar (ControlPlane)."""
    cp = ControlPlane(state, profile_for, tracing=tracing, discovery=discovery, direct=direct)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await cp.start()
    follower = loop.create_task(cp.follow_file(watch)) if watch is not None else None
    try:
        await stop.wait()
    finally:
        if follower is not None:
            follower.cancel()
        await cp.stop()
        if tracing is not None:
            await tracing.aclose()

