"""The whole mesh on loopback: certificates, one process per service, health, traffic, teardown.

Used by `meshctl demo` (and, with sidecars, by `meshctl up`). Ports come from mesh.yaml, or with
`free_ports=True` from the kernel, so a test run never collides with a demo left running.
"""

from __future__ import annotations

import errno
import random
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from aivo_mesh.config.loader import load_mesh
from aivo_mesh.config.model import MeshSpec, to_data
from aivo_mesh.config.ports import POD_RESERVED
from aivo_mesh.errors import PkiError, StartupError
from aivo_mesh.pki import init_ca, issue_leaf, known_identities, load_identity
from aivo_mesh.pki.crypto import parse_certs
from aivo_mesh.pki.peer import PeerPolicy, Role
from aivo_mesh.runtime.sockets import unix_listen_problem
from aivo_mesh.runtime.state import StateDir, running_meshes
from aivo_mesh.runtime.supervisor import Managed, Supervisor

if TYPE_CHECKING:
    from aivo_mesh.runtime.mesh import RuntimeInfo

# The identity `meshctl up` and `demo` call the services with (health checks, demo traffic).
CLIENT_IDENTITY = "mesh-client"


def free_port() -> int:
    return free_ports(1)[0]


# Where free ports are drawn from: below the kernel's ephemeral range (Linux: 32768-60999), whose ports
# any outgoing connection may take as its source port between the moment a port is chosen here and the
# moment its server binds it (an Envoy then fails to start, or a probe connects to itself); and above
# the ports services usually own. Without that range to read, the kernel picks (`bind(0)`).
UNRESERVED_LOW = 20000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _unreserved_ports() -> range | None:
    try:
        low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return range(UNRESERVED_LOW, low) if low - UNRESERVED_LOW >= 1000 else None


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all sockets held open until every port is chosen), outside the
    ephemeral range where the kernel says what it is."""
    pool = _unreserved_ports()
    draw = random.Random()
    socks: list[socket.socket] = []
    misses = 0
    try:
        while len(socks) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                # bind() without SO_REUSEADDR fails on a port in use or in TIME_WAIT: both are skipped.
                s.bind(("127.0.0.1", draw.choice(pool) if pool is not None and misses < 100 + n else 0))
            except OSError:
                s.close()
                misses += 1
                continue
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def listen_problem(host: str, port: int, what: str) -> str | None:
    """Why a server could not listen on host:port now (a one-line message naming the port and `what`
    uses it), or None if it could. Probed as the servers bind: SO_REUSEADDR, so a port whose old
    connections linger in TIME_WAIT counts as free."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        return f"cannot listen on {host}:{port} ({what}): {host!r} does not resolve ({exc.strerror})"
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} in use: {what} cannot listen on {host}:{port} (another process has it)"
            return f"cannot listen on {host}:{port} ({what}): {exc.strerror}"
    return None


def with_free_ports(mesh: MeshSpec) -> MeshSpec:
    """A copy of the mesh whose every service port is a distinct free loopback port."""
    # Not a port the sidecar takes in a pod (50051 is an ephemeral port on Linux): the mesh would not load.
    ports = iter(p for p in free_ports(6 * len(mesh.services) + 2 + len(POD_RESERVED)) if p not in POD_RESERVED)
    control_plane = mesh.control_plane.model_copy(update={"address": f"127.0.0.1:{next(ports)}",
                                                          "admin_address": f"127.0.0.1:{next(ports)}"})
    services = []
    for svc in mesh.services:
        sidecar = svc.sidecar.model_copy(update={
            "inbound_port": next(ports), "outbound_port": next(ports), "admin_port": next(ports)})
        services.append(svc.model_copy(update={
            "port": next(ports), "local_port": next(ports), "admin_port": next(ports),
            "sidecar": sidecar, "endpoints": ()}))
    return mesh.model_copy(update={"services": tuple(services), "control_plane": control_plane})


def dump_mesh(mesh: MeshSpec) -> str:
    data = to_data(mesh, exclude_none=True)
    return "# generated by meshctl: the effective mesh of this local run\n" + yaml.safe_dump(
        data, sort_keys=False)


def ensure_certs(state: StateDir, mesh: MeshSpec) -> list[str]:
    """Create the CA and any missing leaf certificates; returns the names issued now."""
    layout = state.certs
    if not layout.ca_cert.exists():
        init_ca(layout, mesh.mesh.trust_domain)
    issued = []
    for name in known_identities(mesh):
        cert, _ = layout.identity_paths(name)
        if not cert.exists():
            issue_leaf(layout, name, mesh)
            issued.append(name)
    return issued


def prepare(state: StateDir, config: str | None, free_ports: bool,
            transform: Callable[[MeshSpec], MeshSpec] | None = None) -> MeshSpec:
    """Load mesh.yaml, pick ports, write the effective mesh into the state dir, issue certificates."""
    state.ensure()
    mesh = load_mesh(config)
    if free_ports:
        mesh = with_free_ports(mesh)
    if transform is not None:
        mesh = transform(mesh)
    state.mesh_file.write_text(dump_mesh(mesh))
    # Round-trip check: the children read this file, so it must mean what we hold.
    mesh = load_mesh(state.mesh_file)
    ensure_certs(state, mesh)
    return mesh


def preflight(state: StateDir, mesh: MeshSpec, procs: Sequence[Managed], info: RuntimeInfo,
              other_ports: str = "--free-ports") -> None:
    """What would make the planned processes fail after they start, found before any starts: each
    identity's certificate, key and CA (load_identity, as the processes and their Envoys load them) and
    each port and Unix socket the plan listens on. Raises StartupError with one line per problem, naming
    the file, port or socket; otherwise a 0644 key or a port in use showed up only as "not healthy within
    20s" and a log line. Ports held by a local mesh running from another state dir (your `meshctl up`
    while `make demo` starts) are said once, naming that mesh, how to stop it and `other_ports` (how to
    give this run other ports), instead of one line per port."""
    problems: list[str] = []
    certs = state.certs
    policy = PeerPolicy.from_mesh(mesh)
    for name in (*mesh.service_names, CLIENT_IDENTITY):
        cert, key = certs.identity_paths(name)
        try:
            # A service serves and calls; the client identity only calls.
            roles: tuple[Role, ...] = ("client",) if name == CLIENT_IDENTITY else ("server", "client")
            ident = load_identity(cert, key, certs.ca_cert, expect_spiffe_id=mesh.spiffe_id(name), roles=roles)
            # What every peer would refuse (a revoked or unpinned certificate) is refused here too.
            refused = policy.vetted(parse_certs(ident.cert_chain_pem, str(cert))[0], roles)
            if refused is not None:
                problems.append(f"{cert}: {refused}")
        except PkiError as exc:
            problems.append(str(exc))
    listens = [(m.address, m.name) for m in procs] + [(m.admin, f"{m.name} admin") for m in procs if m.admin]
    listens += [(ep.outbound, f"{name}-envoy outbound") for name, ep in info.services.items() if ep.outbound]
    busy: list[tuple[int, str]] = []
    for address, what in listens:
        if address.startswith("unix:"):  # the sidecar plane's app and outbound legs (runtime/sockets.py)
            if problem := unix_listen_problem(address.removeprefix("unix:"), what):
                problems.append(problem)
            continue
        host, _, port = address.rpartition(":")
        if problem := listen_problem(host.strip("[]"), int(port), what):
            busy.append((int(port), problem))
    if busy:
        problems += _held_ports(state, busy, other_ports)
    if problems:
        raise StartupError("\n".join(problems))


def _held_ports(state: StateDir, busy: list[tuple[int, str]], other_ports: str) -> list[str]:
    """The problems of the ports in `busy` (port, problem): one line per local mesh that holds some of
    them (running from another state dir), then one line per other port."""
    here = state.root.resolve()
    lines: list[str] = []
    for other in running_meshes():
        if other.root.resolve() == here:
            continue
        held = other.tcp_ports()
        ports = sorted({port for port, _ in busy if port in held})
        if not ports:
            continue
        busy = [(port, problem) for port, problem in busy if port not in held]
        shown = ", ".join(map(str, ports[:5])) + (f" and {len(ports) - 5} more" if len(ports) > 5 else "")
        lines.append(f"{len(ports)} port{'s' if len(ports) > 1 else ''} ({shown}) {'are' if len(ports) > 1 else 'is'} "
                     f"held by your mesh running from {other.root}: stop it with `meshctl down --state-dir "
                     f"{other.root}`, or give this run other ports with {other_ports}")
    return lines + [problem for _, problem in busy]


async def start_services(sup: Supervisor, mesh: MeshSpec, services: Sequence[str] | None = None) -> None:
    """Start the proxyless services (without a collector or a control plane: each reads mesh.yaml) of the
    plan `meshctl up` would run."""
    from aivo_mesh.runtime.mesh import plan

    wanted = set(services or mesh.service_names)
    procs, _ = plan(sup.state, mesh, "proxyless", collector_port=None, control_plane=False)
    for m in procs:
        if m.name in wanted:
            await sup.start(m)
