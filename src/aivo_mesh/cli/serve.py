"""`meshctl serve` and `meshctl demo`: the mesh running on this machine (`status`: cli/observe.py).

What each command runs (config, grpc, the client, discovery, telemetry, rich's tables) is imported in
the command, not when meshctl starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from aivo_mesh.cli._complete import complete_services
from aivo_mesh.cli._output import rich_console
from aivo_mesh.cli._root import PORT, cli
from aivo_mesh.cli._state import state_dir_option
from aivo_mesh.cli.consul_cmd import agent_address, consul_address
from aivo_mesh.runtime.state import DEMO_STATE_DIR, HEALTHY_WITHIN, StateDir, pid_alive

if TYPE_CHECKING:
    from rich.console import Console
    from rich.status import Status

    from aivo_mesh.discovery.facade import DnsOptions

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
              help="sidecar plane: call peers through this local Envoy outbound listener (mTLS with the "
                   "service's own certificate when mesh.yaml sets its sidecar.outbound_tls)")
@click.option("--plaintext-peers", is_flag=True,
              help="transparent-proxy plane (Linkerd): call peers in plaintext, the pod's proxy adds mTLS")
@click.option("--control-plane", default=None, metavar="HOST:PORT",
              help="take routes, policies, endpoints and allow rules live from this control plane (ADS, mTLS "
                   "with the service's certificate); mesh.yaml's are in force until its first configuration")
@click.option("--grace", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="drain time on shutdown (s)")
@click.option("--warm-timeout", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="before serving, connect to the peers the service may call (mTLS handshake, certificate "
                   "checked), waiting this long at most (s); a peer that is down is logged; 0: don't. "
                   "Not behind a sidecar, which warms its own clusters")
@click.option("--log-format", type=click.Choice(["json", "text"]), default="json", show_default=True)
@click.option("--handshake-log/--no-handshake-log", default=True, show_default=True,
              help="log refused TLS handshakes (reason, peer) and count them in mtls_refused_connections_total, "
                   "from grpc core's stderr, relayed by a helper process")
def serve(service: str, config: str | None, certs_dir: str, data_dir: str | None, port: int | None,
          admin_port: int | None, consul: str | None, discovery: str, dns_template: str, dns_server: str | None,
          insecure: bool, unix_socket: str | None, sidecar_outbound: str | None, plaintext_peers: bool,
          control_plane: str | None, grace: float, warm_timeout: float, log_format: str,
          handshake_log: bool) -> None:
    """Run one demo SERVICE (auth-svc, learner-svc, event-collector-svc, analytics-svc)."""
    from aivo_mesh.config.env import EnvSettings, apply_env
    from aivo_mesh.config.loader import find_mesh_file, load_mesh
    from aivo_mesh.eventloop import loop_choice
    from aivo_mesh.pki import CertLayout
    from aivo_mesh.scheduling import choice_from_env as scheduling_choice

    # The variables the platform deploys services with (SERVICE_NAME, GRPC_PORT, CA_CERT_PATH, ...).
    env = EnvSettings.from_environ()
    # And the loop and scheduling policy `run` will take: a bad AIVO_MESH_EVENT_LOOP or AIVO_MESH_SCHEDULING is
    # refused (exit 2) before anything starts.
    loop_choice(None)
    scheduling_choice(None)
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
    dns = dns_options(dns_template, dns_server) if discovery == "dns" else None
    if control_plane is not None and (insecure or sidecar_outbound or plaintext_peers):
        raise click.BadParameter("a proxyless service's own option: behind a sidecar or a transparent proxy, "
                                 "the proxy takes the control plane's configuration", param_hint="--control-plane")
    if control_plane is not None and discovery != "static":
        raise click.BadParameter("the control plane sends the endpoints: drop --discovery (give it to "
                                 "`meshctl control-plane`)", param_hint="--control-plane")
    data = Path(data_dir) if data_dir else Path(".state/data") / service
    data.mkdir(parents=True, exist_ok=True, mode=0o700)

    # Before grpc is imported (it reads GRPC_TRACE then): the capture turns on core's handshaker tracer.
    from aivo_mesh.runtime.handshakes import capture_handshakes

    capture = capture_handshakes() if handshake_log and not insecure else None

    from aivo_mesh.eventloop import run
    from aivo_mesh.runtime.serve import ServeOptions, serve_service
    from aivo_mesh.telemetry.logs import configure_logging

    configure_logging("INFO", json=log_format == "json")
    if capture is not None and capture.problem:
        import logging

        logging.getLogger("aivo_mesh.tls").warning("refused TLS handshakes are not captured: %s", capture.problem)
    options = ServeOptions(
        insecure=insecure, port=port, admin_port=admin_port, unix_socket=unix_socket, consul=consul,
        discovery=discovery,  # type: ignore[arg-type]  # click.Choice
        consul_discovery=agent_address(consul) if discovery == "consul" else None, dns=dns,
        sidecar_outbound=sidecar_outbound, plaintext_peers=plaintext_peers, control_plane=control_plane,
        cert=env.client_cert_path, key=env.client_key_path, ca=env.ca_cert_path,
        mesh_file=find_mesh_file(config), handshake_log=handshake_log, otel_service_name=env.otel_service_name,
        grace=grace, warm_timeout=warm_timeout)
    # uvloop where installed (aivo_mesh.eventloop), SCHED_BATCH where Linux has it (aivo_mesh.scheduling);
    # the server's "serving on" line names both.
    run(serve_service(mesh, service, CertLayout(Path(certs_dir)), data, options))


def dns_options(template: str, server: str | None) -> DnsOptions:
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
              help="seconds to wait for all-healthy (default " + ", ".join(
                  f"{s:.0f} {plane}" for plane, s in HEALTHY_WITHIN.items()) + ")")
def demo(duration: float, plane: str, config: str | None, state_dir: StateDir, free_ports: bool, workers: int,
         timeout: float | None) -> None:
    """Bring up the whole mesh on loopback, drive the main flow, print a table, shut down."""
    import asyncio

    from rich.table import Table

    from aivo_mesh.runtime.demo import DemoOptions, NotHealthy, run_demo
    from aivo_mesh.telemetry.otlp_receiver import render_waterfall

    options = DemoOptions(plane=plane, duration=duration, workers=workers, config=config,  # type: ignore[arg-type]
                          free_ports=free_ports, timeout=timeout)
    console = rich_console()
    with console.status("") as status:
        try:
            result = asyncio.run(run_demo(state_dir, options, _DemoConsole(console, status, plane)))
        except NotHealthy as exc:
            for name, st in exc.health.items():
                console.print(f"  {name}: {st}")
            for name, code, log in exc.exited:
                console.print(f"[red]{name} exited with {'?' if code is None else code}; log: {log}[/red]")
            raise
    table = Table(title=f"aivo-mesh demo ({plane} plane): {result.flows} flows in {duration:.0f}s")
    for col in ("service", "endpoint", "identity", "calls", "errors", "p50", "p99"):
        table.add_column(col, justify="right" if col in ("calls", "errors", "p50", "p99") else "left")
    for s in result.services:
        table.add_row(s.name, s.address, s.identity, str(s.calls), str(s.errors), _ms(s.p50), _ms(s.p99))
    console.print(table)
    if result.errors:
        console.print(f"[yellow]errors: {result.errors}[/yellow]")
    if result.trace is not None:
        console.print("a learner -> auth trace (meshctl traces shows more):")
        console.print(render_waterfall(result.trace, width=30), markup=False, highlight=False)
    if not result.ok:
        sys.exit(1)


class _DemoConsole:
    """runtime.demo.DemoProgress on the console: a status line, and a line each when healthy and when stopped."""

    def __init__(self, console: Console, status: Status, plane: str) -> None:
        self.console = console
        self._status = status
        self.plane = plane

    def status(self, text: str) -> None:
        self._status.update(text)

    def healthy(self, services: int, seconds: float) -> None:
        self.console.print(f"[green]all {services} services SERVING over mTLS ({self.plane} plane) in "
                           f"{seconds:.1f}s[/green]")

    def stopped(self) -> None:
        self.console.print("all processes stopped")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


async def demo_processes(state: StateDir) -> list[dict[str, Any]]:
    import asyncio

    from aivo_mesh.client import MeshClient, MeshConfig
    from aivo_mesh.config.loader import load_mesh
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
