"""`meshctl serve`, `meshctl demo` and `meshctl status`: the mesh running on this machine."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from aivo_mesh.cli._complete import complete_services
from aivo_mesh.cli._output import emit, json_alias_option, output_option, pick_output
from aivo_mesh.cli._root import PORT, cli
from aivo_mesh.cli._state import state_dir_option
from aivo_mesh.cli.consul_cmd import agent_address, consul_address
from aivo_mesh.config.loader import find_mesh_file, load_mesh
from aivo_mesh.errors import MeshError
from aivo_mesh.pki import CertLayout
from aivo_mesh.runtime.state import DEMO_STATE_DIR, StateDir, pid_alive

if TYPE_CHECKING:
    from aivo_mesh.discovery.facade import DnsOptions
    from aivo_mesh.runtime.collector import SpanLog
    from aivo_mesh.telemetry.otlp_receiver import Trace

HEALTHY_WITHIN = 15.0  # seconds: the demo's promise on 2 cores


def _console() -> Console:
    """Rich console; when output is not a terminal (CI, pipes) keep tables wide enough to read."""
    c = Console()
    return c if c.is_terminal else Console(width=160)


@cli.command()
@click.argument("service", shell_complete=complete_services)
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              help="mesh.yaml (default: $AIVO_MESH_CONFIG, else ./mesh.yaml, else the repository's)")
@click.option("--certs", "certs_dir", type=click.Path(file_okay=False), default="certs", show_default=True,
              help="certificate directory (meshctl certs layout)")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="where the service keeps its data (default: .state/data/SERVICE)")
@click.option("--port", type=PORT, default=None, help="override the mesh port from mesh.yaml")
@click.option("--admin-port", type=PORT, default=None, help="admin endpoint port (default: mesh.yaml admin_port)")
@click.option("--consul", default=None, metavar="HOST:PORT", callback=consul_address,
              help="register in this Consul agent while serving (and discover peers there with --discovery consul)")
@click.option("--discovery", type=click.Choice(["static", "dns", "consul"]), default="static", show_default=True,
              envvar="AIVO_DISCOVERY", show_envvar=True,
              help="where the client finds its peers: mesh.yaml, DNS (A/AAAA or SRV) or Consul (passing only)")
@click.option("--dns-template", default="{host}:{port}", show_default=True, metavar="TEMPLATE",
              help="--discovery dns: each peer's DNS name, from {name} {host} {port} {namespace}; "
                   "a first label starting with _ is an SRV name (_grpc._tcp.{name}.example.internal)")
@click.option("--dns-server", default=None, metavar="IP[:PORT]",
              help="--discovery dns: ask this server (default: the system resolver)")
@click.option("--insecure", is_flag=True, help="PLAINTEXT, no mTLS: local debugging, or behind a sidecar")
@click.option("--unix-socket", default=None, metavar="PATH", type=click.Path(dir_okay=False),
              help="listen on this Unix domain socket (made 0600) instead of a TCP port: an app behind its "
                   "sidecar on a shared machine, where only the socket's owner may reach it")
@click.option("--sidecar-outbound", default=None, metavar="HOST:PORT|unix:PATH",
              help="sidecar plane: call peers through this local Envoy outbound listener")
@click.option("--plaintext-peers", is_flag=True,
              help="transparent-proxy plane (Linkerd): call peers in plaintext, the pod's proxy adds mTLS")
@click.option("--grace", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="drain time on shutdown (s)")
@click.option("--log-format", type=click.Choice(["json", "text"]), default="json", show_default=True)
@click.option("--handshake-log/--no-handshake-log", default=True, show_default=True,
              help="log refused TLS handshakes (reason, peer) and count them in mtls_refused_connections_total, "
                   "from grpc core's stderr, relayed by a helper process")
def serve(service: str, config: str | None, certs_dir: str, data_dir: str | None, port: int | None,
          admin_port: int | None, consul: str | None, discovery: str, dns_template: str, dns_server: str | None,
          insecure: bool, unix_socket: str | None, sidecar_outbound: str | None, plaintext_peers: bool,
          grace: float, log_format: str, handshake_log: bool) -> None:
    """Run one demo SERVICE (auth-svc, learner-svc, event-collector-svc, analytics-svc)."""
    from aivo_mesh.config.env import EnvSettings, apply_env

    # The variables the platform deploys services with (SERVICE_NAME, GRPC_PORT, CA_CERT_PATH, ...).
    env = EnvSettings.from_environ()
    if env.service_name is not None and env.service_name != service:
        raise click.BadParameter(f"SERVICE_NAME={env.service_name} but asked to serve {service}",
                                 param_hint="SERVICE")
    if env.service_name is None and any(v is not None for v in (env.grpc_port, env.local_service_port,
                                                                 env.service_version)):
        env = dataclasses.replace(env, service_name=service)
    mesh = apply_env(load_mesh(config), env)
    if service not in mesh.service_names:
        raise click.BadParameter(f"unknown service {service!r}; mesh.yaml defines "
                                 f"{', '.join(mesh.service_names)}", param_hint="SERVICE")
    dns = _dns_options(dns_template, dns_server) if discovery == "dns" else None
    data = Path(data_dir) if data_dir else Path(".state/data") / service
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = None
    if env.client_cert_path or env.client_key_path or env.ca_cert_path:
        layout = CertLayout(Path(certs_dir))
        cert, key = layout.identity_paths(service)
        paths = (env.client_cert_path or cert, env.client_key_path or key, env.ca_cert_path or layout.ca_cert)

    # Before grpc is imported (it reads GRPC_TRACE then): the capture turns on core's handshaker tracer.
    from aivo_mesh.runtime.handshakes import capture_handshakes

    capture = capture_handshakes() if handshake_log and not insecure else None

    from aivo_mesh.runtime.serve import serve_service
    from aivo_mesh.telemetry.logs import configure_logging

    configure_logging("INFO", json=log_format == "json")
    if capture is not None and capture.problem:
        import logging

        logging.getLogger("aivo_mesh.tls").warning("refused TLS handshakes are not captured: %s", capture.problem)
    asyncio.run(serve_service(mesh, service, CertLayout(Path(certs_dir)), data, insecure=insecure,
                              port=port, admin_port=admin_port, consul=consul, grace=grace,
                              sidecar_outbound=sidecar_outbound, plaintext_peers=plaintext_peers,
                              unix_socket=unix_socket,
                              cert_paths=paths, discovery=discovery, mesh_file=find_mesh_file(config),
                              handshake_log=handshake_log, otel_service_name=env.otel_service_name,
                              consul_discovery=agent_address(consul) if discovery == "consul" else None,
                              dns=dns))


def _dns_options(template: str, server: str | None) -> DnsOptions:
    from aivo_mesh.discovery.facade import DnsOptions

    try:  # a template naming an unknown field fails here, before anything starts
        template.format(name="x", host="x", port=1, namespace="x")
    except (KeyError, IndexError, ValueError) as exc:
        raise click.BadParameter(f"{template!r}: {exc!r}; fields are {{name}} {{host}} {{port}} {{namespace}}",
                                 param_hint="'--dns-template'") from None
    if server is None:
        return DnsOptions(template=template)
    if server.startswith("["):  # [v6]:port
        host, _, rest = server[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
    elif server.count(":") == 1:
        host, _, port = server.partition(":")
    else:  # v4, or a bare v6
        host, port = server, ""
    try:
        ipaddress.ip_address(host)
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(port)
    except ValueError:
        raise click.BadParameter(f"{server!r}: expected IP, IP:PORT or [IPv6]:PORT (a resolver is "
                                 "asked by address)", param_hint="'--dns-server'") from None
    return DnsOptions(template=template, nameservers=(host,), port=int(port) if port else 53)


@cli.command()
@click.option("--duration", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="seconds of traffic")
@click.option("--plane", type=click.Choice(["sidecar", "proxyless"]), default="sidecar", show_default=True,
              help="Envoy sidecars (needs the envoy extra) or MeshClient/MeshServer alone")
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None, help="mesh.yaml")
@state_dir_option(starts=DEMO_STATE_DIR)
@click.option("--free-ports/--mesh-ports", default=False, show_default=True,
              help="use free loopback ports instead of those in mesh.yaml")
@click.option("--workers", type=click.IntRange(min=1), default=4, show_default=True, help="concurrent demo flows")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help=f"seconds to wait for all-healthy (default {HEALTHY_WITHIN:.0f}, +5 for sidecars)")
def demo(duration: float, plane: str, config: str | None, state_dir: StateDir, free_ports: bool, workers: int,
         timeout: float | None) -> None:
    """Bring up the whole mesh on loopback, drive the main flow, print a table, shut down."""
    if state_dir.running():  # its files are in use: a demo would rewrite them under the running processes
        raise MeshError(f"a mesh is running from {state_dir.root} (meshctl down --state-dir {state_dir.root}); "
                        "give the demo another --state-dir")
    code = asyncio.run(_demo(duration, plane, config, state_dir, free_ports, workers, timeout))
    if code:
        sys.exit(code)


async def _demo(duration: float, plane: str, config: str | None, state: StateDir, free_ports: bool,
                workers: int, timeout: float | None = None) -> int:
    from aivo_mesh.client import MeshClient, MeshConfig
    from aivo_mesh.runtime.collector import SpanLog
    from aivo_mesh.runtime.driver import drive
    from aivo_mesh.runtime.health import wait_serving
    from aivo_mesh.runtime.local import free_port, preflight, prepare
    from aivo_mesh.runtime.mesh import LocalTracing, mesh_for_clients, plan
    from aivo_mesh.runtime.status import peers_healthy
    from aivo_mesh.runtime.supervisor import Supervisor
    from aivo_mesh.telemetry.otlp_receiver import render_waterfall

    console = _console()
    started = time.monotonic()
    otlp = free_port()
    tracing = LocalTracing(otlp)  # as `meshctl up`: the collector forwards to Jaeger
    mesh = prepare(state, config, free_ports, transform=tracing)
    (state.root / "traces.jsonl").unlink(missing_ok=True)
    procs, info = plan(state, mesh, plane, otlp, tracing.forward_to)  # type: ignore[arg-type]
    preflight(state, mesh, procs, info, other_ports="--free-ports (make demo ARGS=--free-ports)")
    view = mesh_for_clients(mesh, info)
    sup = Supervisor(state)
    client = MeshClient(MeshConfig.for_identity("mesh-client", state.certs, view))
    limit = timeout or HEALTHY_WITHIN + (5 if plane == "sidecar" else 0)
    try:
        with console.status(f"starting the {plane} mesh...") as status:
            for m in procs:
                await sup.start(m)
            status.update("waiting for SERVING over grpc.health.v1 ...")
            health = await wait_serving(client, mesh.service_names, timeout=limit)
            if plane == "sidecar":  # panic routing is off: traffic waits until each sidecar sees its peers healthy
                status.update("waiting for the sidecars' health checks of their peers ...")
                admins = [ep.sidecar_admin for ep in info.services.values() if ep.sidecar_admin]
                settle = time.monotonic() + max(0.0, limit - (time.monotonic() - started))
                while not all(await asyncio.gather(*(asyncio.to_thread(peers_healthy, a) for a in admins))):
                    if time.monotonic() > settle:
                        raise MeshError(f"sidecars did not see their peers healthy within {limit:.0f}s")
                    await asyncio.sleep(0.1)
        ready_in = time.monotonic() - started
        if any(v != "SERVING" for v in health.values()) or sup.exited():
            for name, st in health.items():
                console.print(f"  {name}: {st}")
            for m in sup.exited():
                console.print(f"[red]{m.name} exited with {m.process.returncode if m.process else '?'}; "
                              f"log: {m.log}[/red]")
            raise MeshError(f"services not healthy within {limit:.0f}s: "
                            f"{ {k: v for k, v in health.items() if v != 'SERVING'} }")
        console.print(f"[green]all {len(health)} services SERVING over mTLS ({plane} plane) in "
                      f"{ready_in:.1f}s[/green]")
        with console.status(f"driving the demo flow for {duration:.0f}s ({workers} workers)..."):
            stats = await drive(client, duration, workers=workers)
        table = Table(title=f"aivo-mesh demo ({plane} plane): {stats.flows} flows in {duration:.0f}s")
        for col in ("service", "endpoint", "identity", "calls", "errors", "p50", "p99"):
            table.add_column(col, justify="right" if col in ("calls", "errors", "p50", "p99") else "left")
        for name in mesh.service_names:
            s = stats.per_service.get(name)
            p50 = s.percentile(50) if s else None
            p99 = s.percentile(99) if s else None
            table.add_row(name, info.services[name].address, mesh.spiffe_id(name), str(s.calls if s else 0),
                          str(s.errors if s else 0), _ms(p50), _ms(p99))
        console.print(table)
        if stats.total_errors:
            codes = {n: s.error_codes for n, s in stats.per_service.items() if s.errors}
            console.print(f"[yellow]errors: {codes}[/yellow]")
        sample = await _sample_trace(SpanLog(state.root / "traces.jsonl"), sidecars=plane == "sidecar")
        if sample is not None:
            console.print("a learner -> auth trace (meshctl traces shows more):")
            console.print(render_waterfall(sample, width=30), markup=False, highlight=False)
        return 0 if stats.flows > 0 and stats.total_errors == 0 else 1
    finally:
        await client.close()
        with console.status("stopping..."):
            await sup.stop_all()
        if info.sockets:
            from aivo_mesh.runtime.sockets import remove_socket_dir

            remove_socket_dir(Path(info.sockets))
        console.print("all processes stopped")


async def _sample_trace(spans: SpanLog, *, sidecars: bool, wait: float | None = None) -> Trace | None:
    """A learner -> auth trace to show, with the spans of both apps and, on the sidecar plane, of both
    sidecars. Every process exports in batches (Envoy and the apps' batch processors every 5 s), so
    the newest traces may still lack spans: wait a bounded while for a complete one (two export
    periods at most), else show the fullest found."""
    want = {"learner-svc", "auth-svc"} | ({"learner-svc-sidecar", "auth-svc-sidecar"} if sidecars else set())

    def has_flow(t: Trace) -> bool:
        return any(sp.name.endswith("/GetProfile") for sp in t.spans) and len(t.spans) > 2

    give_up = time.monotonic() + (wait if wait is not None else 11)
    while True:
        flows = [t for t in spans.traces(200) if has_flow(t)]
        if (found := next((t for t in flows if want <= set(t.services)), None)) is not None:
            return found
        if time.monotonic() >= give_up:
            return max(flows, key=lambda t: len(want & set(t.services)), default=None)
        await asyncio.sleep(0.2)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


@cli.command()
@state_dir_option()
@output_option
@json_alias_option
@click.option("--interval", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="seconds between rate samples (0: no rates)")
def status(state_dir: StateDir, output: str, as_json: bool, interval: float) -> None:
    """Health, sidecars, upstreams, breakers and load of the mesh running from a state dir.

    Data (-o json|yaml): `services` lists a `meshctl up` mesh's services, `processes` the processes of a
    `meshctl demo` run (no supervisor); both keys are always there, empty when they do not apply."""
    from aivo_mesh.runtime.mesh import RuntimeInfo
    from aivo_mesh.runtime.status import gather

    output = pick_output(output, as_json)
    state = state_dir
    info = RuntimeInfo.read(state)

    def data(plane: str | None, services: list[dict[str, Any]], procs: list[dict[str, Any]]) -> dict[str, Any]:
        return {"state_dir": str(state.root), "plane": plane, "observed_at": time.time(), "services": services,
                "processes": procs}

    if info is None:  # a `meshctl demo` run (no supervisor): list its processes
        procs = asyncio.run(_status(state))
        if output != "text":
            emit(data(None, [], procs), output)
            return
        ptable = Table(title=f"aivo-mesh status ({state.root})")
        for col in ("name", "role", "pid", "address", "process", "health", "breakers", "upstreams"):
            ptable.add_column(col)
        for r in procs:
            ptable.add_row(r["name"], r["role"], str(r["pid"]), r["address"], r["process"], r["health"],
                           ", ".join(f"{k}={v}" for k, v in r["breakers"].items()) or "-",
                           ", ".join(f"{k}: {v}" for k, v in r["upstreams"].items()) or "-")
        _console().print(ptable if procs else f"nothing running from {state.root}")
        return
    services = asyncio.run(gather(state, interval))
    if output != "text":
        emit(data(info.plane, [sv.as_dict() for sv in services], []), output)
        return
    table = Table(title=f"aivo-mesh status: {info.plane} plane ({state.root})")
    for col in ("service", "process", "health", "sidecar", "upstreams", "breakers", "rps", "p99"):
        table.add_column(col, justify="right" if col in ("rps", "p99") else "left")
    for sv in services:
        table.add_row(sv.service, sv.process + (f" ({sv.restarts} restarts)" if sv.restarts else ""), sv.health,
                      sv.sidecar, "\n".join(f"{k}: {v}" for k, v in sv.upstreams.items()) or "-",
                      _breakers_cell(sv.breakers, sv.envoy_breakers),
                      "-" if sv.rps is None else f"{sv.rps:.1f}",
                      "-" if sv.p99_ms is None else f"{sv.p99_ms:.0f} ms")
    _console().print(table)


def _breakers_cell(app: dict[str, str], envoy: dict[str, str]) -> str:
    """One line per peer: the app's breaker and, on the sidecar plane, its sidecar's thresholds."""
    lines = []
    for peer in sorted(app.keys() | envoy.keys()):
        parts = [f"app {app[peer]}"] if peer in app else []
        if peer in envoy:
            parts.append(f"envoy {envoy[peer]}")
        lines.append(f"{peer}: {', '.join(parts)}")
    return "\n".join(lines) or "-"


async def _status(state: StateDir) -> list[dict[str, Any]]:
    from aivo_mesh.client import MeshClient, MeshConfig
    from aivo_mesh.runtime.health import check
    from aivo_mesh.runtime.status import mesh_upstreams

    records = state.read_processes()
    if not records:
        return []
    mesh = load_mesh(state.mesh_file)
    client = MeshClient(MeshConfig.for_identity("mesh-client", state.certs, mesh), health_checks=False,
                        reload_interval=None)
    try:
        rows = []
        for r in records:
            alive = pid_alive(r.pid)
            health = "-"
            breakers: dict[str, Any] = {}
            upstreams: dict[str, Any] = {}
            if alive and r.role == "service" and r.name in mesh.service_names:
                health = await check(client, r.name)
            if alive and r.admin:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    breakers, upstreams = await asyncio.to_thread(mesh_upstreams, r.admin)
            rows.append({"name": r.name, "role": r.role, "pid": r.pid, "address": r.address, "admin": r.admin,
                         "process": "running" if alive else "exited", "health": health,
                         "breakers": breakers, "upstreams": upstreams})
        return rows
    finally:
        await client.close()
