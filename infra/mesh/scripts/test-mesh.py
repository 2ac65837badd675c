#!/usr/bin/env python3
"""Check a RUNNING mesh from the outside, the way a caller sees it.

    python infra/mesh/scripts/test-mesh.py --services auth-svc,learner-svc,event-collector-svc \\
        [--state-dir DIR] [--json]

Reads the state directory of a mesh started by `meshctl up` (or the demo-style local runtime):

    <state>/mesh.yaml      the effective mesh (ports included)
    <state>/certs/         the mesh PKI (`meshctl certs` layout): the probes use these identities
    <state>/runtime.json   written by `meshctl up`: per service `address` (where mTLS callers reach it:
                           the Envoy inbound, or the proxyless mesh port), `admin` (aivo-mesh admin
                           endpoint), `sidecar_admin` (Envoy admin, or null), and on the sidecar plane
                           `app` / `outbound` (unix:<path>: the plaintext legs). Absent: a proxyless
                           mesh, address = host:port and admin = metrics host:admin_port.

Per service:

    health            grpc.health.v1 SERVING over mTLS with the mesh-client certificate, the server
                      verified under its own service name (grpc.default_authority)
    server identity   the same server is refused under another name (its certificate does not match)
    plaintext         a plaintext connection gets no answer
    no client cert    a TLS connection without a client certificate gets no answer
    authorization     an identity outside the allow-list calling a method gets PERMISSION_DENIED
    route <method>    one call per mesh.yaml route, with an allowed identity, within the route's
                      deadline; any status but UNAVAILABLE / DEADLINE_EXCEEDED / PERMISSION_DENIED
                      proves the route answered (an empty request earning INVALID_ARGUMENT or
                      UNAUTHENTICATED is an answer, and has no side effects)
    metrics           GET <admin>/metrics answers Prometheus text
    admin             GET <admin>/ready is LIVE and GET <admin>/clusters answers JSON
    envoy admin       GET <sidecar_admin>/ready is LIVE (sidecar plane only)
    local legs        (sidecar plane) the app and outbound legs are Unix sockets 0600 owned by this user
                      in a 0700 folder, and 127.0.0.1:<local_port> / :<outbound port> refuse connections

Prints a pass/fail table and exits 1 if anything failed (2 for bad arguments or a missing state
directory). When a service does not answer its health check, the checks that need it to answer are
skipped: its failing health row says why.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import stat
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The refused-connection probes make grpc core log handshake errors on stderr; the table says it all.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from aivo_mesh.config.loader import load_mesh
from aivo_mesh.config.model import MeshSpec, ServiceSpec
from aivo_mesh.config.patterns import covers, is_prefix
from aivo_mesh.config.resolve import route_policy
from aivo_mesh.errors import MeshError
from aivo_mesh.pki import CertLayout
from aivo_mesh.runtime.state import resolve_state_dir
from aivo_mesh.server.authz import Authorizer
from aivo_mesh.services import protos

REACHABLE_FAILURES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                      grpc.StatusCode.PERMISSION_DENIED}
NO_ANSWER = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
PROBE_TIMEOUT = 3.0
HTTP_TIMEOUT = 3.0
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"

# Generated modules of the platform's services: fully-qualified service -> (messages, stubs).
_MODULES = ((protos.auth_pb2, protos.auth_pb2_grpc), (protos.learner_pb2, protos.learner_pb2_grpc),
            (protos.events_pb2, protos.events_pb2_grpc), (protos.analytics_pb2, protos.analytics_pb2_grpc))
GENERATED: dict[str, tuple[Any, Any]] = {
    f"{pb2.DESCRIPTOR.package}.{name}": (pb2, pb2_grpc)
    for pb2, pb2_grpc in _MODULES for name in pb2.DESCRIPTOR.services_by_name
}


@dataclass
class Row:
    service: str
    check: str
    result: str
    detail: str


@dataclass
class Endpoints:
    address: str
    admin: str | None
    sidecar_admin: str | None
    app: str | None = None  # sidecar plane: unix:<path> of the app behind its sidecar
    outbound: str | None = None  # sidecar plane: unix:<path> of the sidecar's outbound listener


# -- state ---------------------------------------------------------------------------------------------

def read_endpoints(state: Path, mesh: MeshSpec) -> tuple[str, dict[str, Endpoints]]:
    """(plane, per-service endpoints) from runtime.json, or the proxyless defaults from mesh.yaml."""
    runtime = state / "runtime.json"
    if runtime.exists():
        data = json.loads(runtime.read_text())
        services = {name: Endpoints(ep["address"], ep.get("admin"), ep.get("sidecar_admin"), ep.get("app"),
                                    ep.get("outbound"))
                    for name, ep in data.get("services", {}).items()}
        return str(data.get("plane", "?")), services
    host = mesh.observability.metrics.host
    return "proxyless", {s.name: Endpoints(f"{s.host}:{s.port}", f"{host}:{s.admin_port}" if s.admin_port else None,
                                           None) for s in mesh.services}


class Identities:
    """Channel credentials of every identity with a certificate in the state directory."""

    def __init__(self, certs: CertLayout, mesh: MeshSpec) -> None:
        self.certs = certs
        self.mesh = mesh
        self.ca = certs.ca_cert.read_bytes()
        self._creds: dict[str, grpc.ChannelCredentials] = {}

    def available(self) -> list[str]:
        """Identities with a certificate, mesh clients first (the probes' own identity)."""
        names = [*self.mesh.mesh.clients, *self.mesh.service_names]
        return [n for n in names if self.certs.identity_paths(n)[0].exists()]

    def credentials(self, name: str) -> grpc.ChannelCredentials:
        if name not in self._creds:
            cert, key = self.certs.identity_paths(name)
            self._creds[name] = grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=key.read_bytes(),
                                                             certificate_chain=cert.read_bytes())
        return self._creds[name]

    def anonymous(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca)


def channel(address: str, authority: str, creds: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    options = [("grpc.default_authority", authority), ("grpc.enable_retries", 0),
               ("grpc.use_local_subchannel_pool", 1)]
    if creds is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, creds, options=options)


def _code(err: grpc.aio.AioRpcError) -> str:
    """`UNAVAILABLE: Socket closed`: the status and the innermost reason grpc gives."""
    details = (err.details() or "").splitlines()[0] if err.details() else ""
    reason = re.sub(r"^(?:[A-Z_]+: )?(?:ipv[46]:\S+: )?", "", details.rpartition("last error: ")[2]).strip()
    return f"{err.code().name}: {reason[:120]}" if reason else err.code().name


# -- gRPC checks ---------------------------------------------------------------------------------------

async def health(ep: Endpoints, svc: ServiceSpec, ids: Identities, authority: str) -> tuple[str | None, str]:
    """(status name or None, detail)."""
    async with channel(ep.address, authority, ids.credentials("mesh-client")) as ch:
        try:
            resp = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=svc.grpc_service), timeout=PROBE_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            return None, _code(err)
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return name, name


async def refused(ep: Endpoints, authority: str, creds: grpc.ChannelCredentials | None) -> tuple[bool, str]:
    """True when a health call over this channel gets no answer."""
    async with channel(ep.address, authority, creds) as ch:
        try:
            resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            return err.code() in NO_ANSWER, f"refused ({_code(err)})" if err.code() in NO_ANSWER else _code(err)
    return False, f"answered {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}"


def methods_of(svc: ServiceSpec) -> list[str]:
    pair = GENERATED.get(svc.grpc_service)
    if pair is None:
        return []
    short = svc.grpc_service.rpartition(".")[2]
    return [f"/{svc.grpc_service}/{m.name}" for m in pair[0].DESCRIPTOR.services_by_name[short].methods]


async def call(ep: Endpoints, svc: ServiceSpec, method: str, creds: grpc.ChannelCredentials,
               timeout: float) -> tuple[grpc.StatusCode, float]:
    """One call of `method` with an empty request (or an empty request stream); (status, seconds)."""
    pb2, pb2_grpc = GENERATED[svc.grpc_service]
    short, name = svc.grpc_service.rpartition(".")[2], method.rpartition("/")[2]
    desc = pb2.DESCRIPTOR.services_by_name[short].methods_by_name[name]
    request = getattr(pb2, desc.input_type.name)()
    started = time.monotonic()
    async with channel(ep.address, svc.name, creds) as ch:
        stub_method = getattr(getattr(pb2_grpc, f"{short}Stub")(ch), name)
        try:
            if desc.client_streaming:
                requests: Iterator[Any] = iter(())
                target = stub_method(requests, timeout=timeout)
            else:
                target = stub_method(request, timeout=timeout)
            if desc.server_streaming:
                async for _ in target:
                    pass
            else:
                await target
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            code = err.code()
    return code, time.monotonic() - started


def disallowed_probe(mesh: MeshSpec, svc: ServiceSpec, ids: Identities) -> tuple[str, str] | None:
    """(identity, method) such that the allow-list refuses the identity that method, preferring the
    service's routes; None when every available identity may call every method."""
    authz = Authorizer(mesh, svc.name)
    methods = [r.match for r in svc.routes if not is_prefix(r.match)] + methods_of(svc)
    for method in methods:
        for ident in ids.available():
            if not authz.allows(mesh.spiffe_id(ident), method):
                return ident, method
    return None


def caller_for(mesh: MeshSpec, svc: ServiceSpec, ids: Identities, method: str) -> str | None:
    authz = Authorizer(mesh, svc.name)
    return next((i for i in ids.available() if authz.allows(mesh.spiffe_id(i), method)), None)


def route_methods(svc: ServiceSpec) -> list[tuple[str, str]]:
    """(route match, a method it covers) for every route; prefixes take their first known method."""
    known = methods_of(svc)
    out = []
    for r in svc.routes:
        if not is_prefix(r.match):
            out.append((r.match, r.match))
            continue
        under = [m for m in known if covers(r.match, m)]
        out.append((r.match, under[0] if under else ""))
    return out


# -- HTTP checks ---------------------------------------------------------------------------------------

def http_get(address: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=HTTP_TIMEOUT) as resp:
            return int(resp.status), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode("utf-8", "replace")
    except OSError as err:
        reason = getattr(err, "reason", err)
        return 0, f"{type(reason).__name__}: {reason}"


async def http(address: str, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(http_get, address, path)


# -- the sidecar plane's plaintext legs ----------------------------------------------------------------

def local_legs(mesh: MeshSpec, svc: ServiceSpec, ep: Endpoints) -> tuple[bool | None, str]:
    """Both plaintext legs only reachable by the mesh's user: Unix sockets 0600 of ours in a 0700 folder
    of ours (docs/security.md), and no loopback TCP listener on the ports they would have had."""
    from aivo_mesh.config.ports import sidecar_ports

    problems, seen = [], []
    for leg, address in (("app", ep.app), ("outbound", ep.outbound)):
        if not address or not address.startswith("unix:"):
            problems.append(f"{leg} on {address or '?'}: not a Unix socket, any local process may connect")
            continue
        path = Path(address.removeprefix("unix:"))
        try:
            sock, folder = os.lstat(path), os.lstat(path.parent)
        except PermissionError:
            return None, f"cannot inspect {path.parent} as uid {os.getuid()} (not the mesh's user)"
        except FileNotFoundError:
            problems.append(f"{leg}: {path} does not exist")
            continue
        modes = (stat.S_IMODE(sock.st_mode), stat.S_IMODE(folder.st_mode))
        if not stat.S_ISSOCK(sock.st_mode) or modes != (0o600, 0o700) or {sock.st_uid, folder.st_uid} != {
                os.getuid()}:
            problems.append(f"{leg}: {path} is mode {modes[0]:04o} uid {sock.st_uid} in a folder of mode "
                            f"{modes[1]:04o} uid {folder.st_uid} (want a socket 0600 in a 0700 folder of ours)")
        seen.append(f"{leg} {path.name}")
    ports = {"app": svc.local_port, "outbound": sidecar_ports(mesh, svc.name, "local").outbound}
    for leg, port in ports.items():
        with socket.socket() as s:
            s.settimeout(HTTP_TIMEOUT)
            # A connect that succeeds to itself (the kernel picked `port` as the source port: TCP's
            # simultaneous open) found no listener.
            if s.connect_ex(("127.0.0.1", port)) == 0 and s.getsockname() != s.getpeername():
                problems.append(f"{leg}: 127.0.0.1:{port} accepts connections")
    if problems:
        return False, "; ".join(problems)
    return True, (f"{', '.join(seen)}: 0600 in a 0700 folder of uid {os.getuid()}; 127.0.0.1:{ports['app']} "
                  f"and :{ports['outbound']} refused")


# -- one service -----------------------------------------------------------------------------------------

async def check_service(mesh: MeshSpec, svc: ServiceSpec, ep: Endpoints, ids: Identities) -> list[Row]:
    rows: list[Row] = []

    def add(check: str, ok: bool | None, detail: str) -> None:
        rows.append(Row(svc.name, check, SKIP if ok is None else PASS if ok else FAIL, detail))

    status, detail = await health(ep, svc, ids, svc.name)
    serving = status == "SERVING"
    add("health", serving, f"{detail} at {ep.address} (server verified as {svc.name})" if status
        else f"{detail} at {ep.address}")
    unreachable = "not checked: the service does not answer its health check"

    async def grpc_check(name: str, fn: Callable[[], Awaitable[tuple[bool | None, str]]]) -> None:
        if not serving:
            add(name, None, unreachable)
            return
        try:
            ok, text = await fn()
        except Exception as exc:
            ok, text = False, f"{type(exc).__name__}: {exc}"
        add(name, ok, text)

    async def wrong_name() -> tuple[bool | None, str]:
        ok, text = await refused(ep, f"not-{svc.name}", ids.credentials("mesh-client"))
        return ok, f"as not-{svc.name}: {text}"

    async def plaintext() -> tuple[bool | None, str]:
        return await refused(ep, svc.name, None)

    async def no_cert() -> tuple[bool | None, str]:
        return await refused(ep, svc.name, ids.anonymous())

    async def authorization() -> tuple[bool | None, str]:
        probe = disallowed_probe(mesh, svc, ids)
        if probe is None:
            return None, "every identity may call every method"
        ident, method = probe
        code, _ = await call(ep, svc, method, ids.credentials(ident), PROBE_TIMEOUT)
        return code == grpc.StatusCode.PERMISSION_DENIED, f"{ident} -> {method}: {code.name}"

    await grpc_check("server identity", wrong_name)
    await grpc_check("plaintext", plaintext)
    await grpc_check("no client cert", no_cert)
    if GENERATED.get(svc.grpc_service) is None:
        add("authorization", None, f"no generated stubs for {svc.grpc_service}")
    else:
        await grpc_check("authorization", authorization)

    for match, method in route_methods(svc):
        name = f"route {match.rpartition('/')[2] or match}"
        if not method or GENERATED.get(svc.grpc_service) is None:
            add(name, None, f"no known method for {match}")
            continue
        caller = caller_for(mesh, svc, ids, method)
        if caller is None:
            add(name, None, f"no identity with a certificate may call {method}")
            continue
        deadline = route_policy(mesh, svc.name, method).timeout

        async def route_call(method: str = method, caller: str = caller,
                             deadline: float = deadline) -> tuple[bool | None, str]:
            code, took = await call(ep, svc, method, ids.credentials(caller), deadline)
            ok = code not in REACHABLE_FAILURES
            return ok, f"{code.name} in {took * 1000:.0f} ms (deadline {deadline:g}s, as {caller})"

        await grpc_check(name, route_call)

    if ep.admin is None:
        add("metrics", None, "no admin_port in mesh.yaml")
        add("admin", None, "no admin_port in mesh.yaml")
    else:
        code, body = await http(ep.admin, "/metrics")
        add("metrics", code == 200 and "# TYPE" in body,
            f"GET {ep.admin}/metrics: {code} ({body.count(chr(10))} lines)" if code else body)
        ready_code, ready = await http(ep.admin, "/ready")
        clusters_code, clusters = await http(ep.admin, "/clusters")
        try:
            targets = len(json.loads(clusters)["clusters"]) if clusters_code == 200 else None
        except (ValueError, KeyError, TypeError):
            targets = None
        ok = ready_code == 200 and ready.strip() == "LIVE" and targets is not None
        add("admin", ok, f"/ready {ready_code} {ready.strip()[:40]}; /clusters {clusters_code}"
            + (f" ({targets} targets)" if targets is not None else ""))
    if ep.sidecar_admin:
        code, body = await http(ep.sidecar_admin, "/ready")
        add("envoy admin", code == 200 and body.strip() == "LIVE", f"GET {ep.sidecar_admin}/ready: {code} "
            f"{body.strip()[:60]}")
    if ep.sidecar_admin:
        add("local legs", *local_legs(mesh, svc, ep))
    return rows


# -- main ----------------------------------------------------------------------------------------------

def print_table(rows: list[Row], plane: str, state: Path) -> None:
    console = Console() if sys.stdout.isatty() else Console(width=160)
    table = Table(title=f"test-mesh: {plane} mesh from {state}")
    for col in ("service", "check", "result", "detail"):
        table.add_column(col, overflow="fold")
    style = {PASS: "green", FAIL: "bold red", SKIP: "yellow"}
    for r in rows:
        table.add_row(r.service, r.check, f"[{style[r.result]}]{r.result}[/]", r.detail)
    console.print(table)
    counts = {k: sum(r.result == k for r in rows) for k in (PASS, FAIL, SKIP)}
    colour = "red" if counts[FAIL] else "green"
    console.print(f"[{colour}]{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped[/]")


async def run(state: Path, names: list[str]) -> tuple[str, list[Row]]:
    mesh = load_mesh(state / "mesh.yaml")
    plane, endpoints = read_endpoints(state, mesh)
    ids = Identities(CertLayout(state / "certs"), mesh)
    rows: list[Row] = []
    for name in names:
        ep = endpoints.get(name)
        if ep is None:
            rows.append(Row(name, "health", FAIL, f"not in {state / 'runtime.json'}: is it running?"))
            continue
        rows.extend(await check_service(mesh, mesh.service(name), ep, ids))
    return plane, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--services", default=None, help="comma-separated services (default: all of mesh.yaml)")
    parser.add_argument("--state-dir", default=None,
                        help="state directory of the running mesh (default: as `meshctl status` finds it: "
                             "$AIVO_MESH_STATE_DIR, else the mesh running from .state/mesh or .state/demo)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        state = resolve_state_dir(args.state_dir).root  # the rule every meshctl command follows
    except MeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not (state / "mesh.yaml").exists() or not (state / "certs").is_dir():
        print(f"error: {state} has no mesh.yaml and certs/: start the mesh first (meshctl up --state-dir {state})",
              file=sys.stderr)
        return 2
    try:
        mesh = load_mesh(state / "mesh.yaml")
    except MeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.services.split(",") if n.strip()] if args.services else list(mesh.service_names)
    unknown = [n for n in names if n not in mesh.service_names]
    if unknown:
        print(f"error: unknown service(s) {', '.join(unknown)}; the mesh has {', '.join(mesh.service_names)}",
              file=sys.stderr)
        return 2
    plane, rows = asyncio.run(run(state, names))
    if args.json:
        print(json.dumps({"plane": plane, "rows": [asdict(r) for r in rows]}, indent=2))
    else:
        print_table(rows, plane, state)
    return 1 if any(r.result == FAIL for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
