"""The local mesh's control plane process: mesh.yaml and the certificates in, snapshots out over ADS.

    inputs     the state dir's effective mesh.yaml; the certificates the peer policy vetted (the keys the
               sidecars trust travel as `mesh_ca`, never a private key); endpoints from mesh.yaml
    snapshots  one node group per sidecar (xds/resources.py), set in the cache (xds/cache.py) only when
               consistent; content-hash versions, so a restarted control plane causes no churn
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
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

from aivo_mesh.config.loader import load_mesh, parse_mesh
from aivo_mesh.config.model import MeshSpec, to_data
from aivo_mesh.errors import ConfigError
from aivo_mesh.fsutil import write_atomic
from aivo_mesh.pki import PeerPolicy
from aivo_mesh.render.envoy import EnvoyProfile
from aivo_mesh.runtime.sidecar_certs import SidecarCertificates, for_local_mesh
from aivo_mesh.runtime.state import StateDir
from aivo_mesh.server.credentials import ReloadingServerCredentials
from aivo_mesh.telemetry.admin import AdminServer, HttpError, Request, Response, error_response, json_response
from aivo_mesh.xds.cache import InconsistentSnapshot, SnapshotCache, type_name
from aivo_mesh.xds.resources import Trust, sidecar_snapshot
from aivo_mesh.xds.server import AdsServer

log = logging.getLogger(__name__)

APPLY_TIMEOUT = 10.0  # seconds apply waits for every connected node's ACK or NACK
CERT_POLL = 1.0

ProfileFor = Callable[[MeshSpec, str], EnvoyProfile]


class ControlPlane:
    def __init__(self, state: StateDir, profile_for: ProfileFor, *, port: int | None = None,
                 admin_port: int | None = None) -> None:
        """Ports default to mesh.yaml's control_plane addresses; 0 takes a free one (tests)."""
        self.state = state
        self.profile_for = profile_for
        self.mesh = load_mesh(state.mesh_file)
        self.cache = SnapshotCache()
        self.vetting: SidecarCertificates = for_local_mesh(state.certs, self.mesh, state.root / "envoy")
        self.ads = AdsServer(self.cache, self._group_of, PeerPolicy.from_mesh(self.mesh))
        (self.host, mesh_port), (self.admin_host, mesh_admin) = (self.mesh.control_plane.host_port,
                                                                 self.mesh.control_plane.admin_host_port)
        self.port = mesh_port if port is None else port
        self.admin_port = mesh_admin if admin_port is None else admin_port
        self.built_at = 0.0
        self.build_seconds = 0.0
        self._server: grpc.aio.Server | None = None
        self._admin: AdminServer | None = None

    # -- node groups ------------------------------------------------------------------------------------
    def _group_of(self, node: Any) -> str | None:
        for name in self.mesh.service_names:
            if node.id == self.mesh.spiffe_id(name):
                return name
        return None

    def rebuild(self, mesh: MeshSpec) -> dict[str, bool]:
        """Every sidecar's snapshot from `mesh`: all checked before any is published, so a mesh that
        does not build changes nothing. {service: whether its snapshot changed}."""
        started = time.monotonic()
        self.vetting.set_mesh(mesh)
        self.vetting.refresh()
        bundle = self.vetting.bundle()
        if bundle is None:
            raise ConfigError.single(str(self.state.certs.root), "", "no vetted certificate: the sidecars would "
                                     "trust nothing")
        trust = Trust(bundle, tuple(self.vetting.pins()))
        snapshots = {name: sidecar_snapshot(mesh, name, self.profile_for(mesh, name), trust)
                     for name in mesh.service_names}
        for name, snap in snapshots.items():
            problems = snap.problems()
            if problems:
                raise InconsistentSnapshot(name, problems)
        changed = {name: self.cache.set(name, snap) for name, snap in snapshots.items()}
        self.mesh = mesh
        self.ads.policy = PeerPolicy.from_mesh(mesh)
        self.build_seconds = time.monotonic() - started
        self.built_at = time.time()
        log.info("snapshots built", extra={"services": len(snapshots),
                                            "changed": sorted(n for n, c in changed.items() if c),
                                            "seconds": round(self.build_seconds, 4)})
        return changed

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
                                                   "host": old.host, "endpoints": old.endpoints}))
        return new.model_copy(update={"services": tuple(services), "observability": self.mesh.observability,
                                      "control_plane": self.mesh.control_plane})

    async def apply(self, text: str, source: str = "mesh.yaml") -> dict[str, Any]:
        mesh = self._keep_running_shape(parse_mesh(text, source))
        changed = self.rebuild(mesh)
        # What a restarted control plane (and `meshctl status`) start from.
        write_atomic(self.state.mesh_file, _dump(mesh))
        verdicts = await self.ads.wait_settled(APPLY_TIMEOUT)
        nodes = [{"node": node, "service": self.ads.nodes[node].group,
                  "changed": changed.get(self.ads.nodes[node].group, False), "outcome": verdict}
                 for node, verdict in sorted(verdicts.items())]
        return {"changed": sorted(n for n, c in changed.items() if c), "nodes": nodes,
                "build_seconds": round(self.build_seconds, 4)}

    # -- serving ----------------------------------------------------------------------------------------
    async def start(self) -> tuple[int, int]:
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
        self._admin = AdminServer(_Source(self), _no_metrics(), self.admin_host, self.admin_port,
                                  extra_routes=self._routes())
        self.admin_port = await self._admin.start()
        log.info("control plane serving ADS on %s:%d, admin on %s", self.host, self.port, self._admin.url)
        return self.port, self.admin_port

    async def follow_certificates(self) -> None:
        """Rotations and revocations reach the sidecars' trust (`mesh_ca`) without a restart."""
        while True:
            await asyncio.sleep(CERT_POLL)
            try:
                if self.vetting.refresh():
                    self.rebuild(self.mesh)
            except (ConfigError, InconsistentSnapshot, OSError) as exc:
                log.error("certificates changed but the snapshots could not be rebuilt: %s", exc)

    async def stop(self) -> None:
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
            try:
                return json_response(200, await self.apply(request.body.decode("utf-8"),
                                                           request.headers.get("x-mesh-file", "mesh.yaml")))
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


def _no_metrics() -> Any:
    from aivo_mesh.telemetry.metrics import MeshMetrics

    return MeshMetrics()


async def run_control_plane(state: StateDir, profile_for: ProfileFor) -> None:
    """The body of `meshctl control-plane`: serve until SIGTERM/SIGINT."""
    cp = ControlPlane(state, profile_for)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await cp.start()
    follower = loop.create_task(cp.follow_certificates())
    try:
        await stop.wait()
    finally:
        follower.cancel()
        await cp.stop()

