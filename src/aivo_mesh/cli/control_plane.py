"""`meshctl apply` (a changed mesh.yaml to the running control plane), `meshctl config-dump` (what a
sidecar holds) and `meshctl control-plane` (hidden: the process `meshctl up` runs on the sidecar plane).

`meshctl apply` to a running control plane imports neither mesh.yaml's model (pydantic) nor grpc: the
control plane checks the file and answers with the same located errors `meshctl config validate` prints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from aivo_mesh.cli._complete import complete_services
from aivo_mesh.cli._output import emit, output_option, rich_console
from aivo_mesh.cli._root import PORT, cli
from aivo_mesh.cli._state import state_dir_option
from aivo_mesh.cli.consul_cmd import agent_address, consul_address
from aivo_mesh.errors import ConfigError, ConfigIssue, MeshError, StateError
from aivo_mesh.runtime.state import RuntimeInfo, StateDir

APPLY_HTTP_TIMEOUT = 30.0  # the control plane answers within its own bound (10 s) plus the build


@cli.command(hidden=True, name="control-plane")
@click.option("--state-dir", type=click.Path(file_okay=False), required=True)
@click.option("--collector-port", type=PORT, default=None,
              help="the local trace collector the sidecars export to (default: none)")
@click.option("--sockets", type=click.Path(file_okay=False), default=None,
              help="the private folder of the apps' and outbound Unix sockets (runtime/sockets.py)")
@click.option("--watch", type=click.Path(dir_okay=False), default=None,
              help="apply each saved change of this mesh.yaml (`meshctl up --watch`)")
@click.option("--discovery", type=click.Choice(["static", "dns", "consul"]), default="static", show_default=True,
              help="where each peer's instances come from: mesh.yaml (`endpoints`, else the peer's sidecar), DNS "
                   "or Consul (every instance, its checks as EDS health)")
@click.option("--consul", default=None, metavar="HOST:PORT", callback=consul_address,
              help="--discovery consul: this agent (default: $CONSUL_HTTP_ADDR or 127.0.0.1:8500)")
@click.option("--dns-template", default="{host}:{port}", show_default=True, metavar="TEMPLATE",
              help="--discovery dns: each peer's DNS name, from {name} {host} {port} {namespace}")
@click.option("--dns-server", default=None, metavar="IP[:PORT]", help="--discovery dns: ask this server")
@click.option("--direct", multiple=True, metavar="SERVICE",
              help="a service without a sidecar (the proxyless plane): callers reach it at its own address "
                   "unless discovery or mesh.yaml `endpoints` say otherwise (repeatable)")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING"], case_sensitive=False), default="INFO",
              show_default=True, help="DEBUG: every discovery request and response, per node")
def control_plane_cmd(state_dir: str, collector_port: int | None, sockets: str | None, watch: str | None,
                      discovery: str, consul: str | None, dns_template: str, dns_server: str | None,
                      direct: tuple[str, ...], log_level: str) -> None:
    """Serve ADS to the local mesh's sidecars (started by `meshctl up`)."""
    import asyncio
    from importlib.metadata import version

    from aivo_mesh.cli.serve import dns_options
    from aivo_mesh.config.loader import load_mesh
    from aivo_mesh.discovery import ConsulDiscovery, Discovery, build_discovery
    from aivo_mesh.runtime.control_plane import run_control_plane
    from aivo_mesh.runtime.mesh import local_profiles, with_tracing
    from aivo_mesh.telemetry.logs import configure_logging
    from aivo_mesh.telemetry.tracing import Tracing

    configure_logging(log_level, json=True)
    state = StateDir(state_dir)
    mesh = load_mesh(state.mesh_file)
    profile_for = local_profiles(state, collector_port or None, Path(sockets) if sockets else None)
    tracing = (Tracing.from_spec(with_tracing(mesh, collector_port).observability.tracing, "control-plane",
                                 version("aivo-mesh")) if collector_port else None)
    found: Discovery | None = None
    if discovery != "static":
        found = build_discovery(
            mesh, discovery, dns=dns_options(dns_template, dns_server) if discovery == "dns" else None,
            # Every instance: Envoy is told which are unhealthy (and sends them nothing).
            consul=ConsulDiscovery(agent_address(consul), passing_only=False) if discovery == "consul" else None)
    unknown = sorted(set(direct) - set(mesh.service_names))
    if unknown:
        raise click.BadParameter(f"not services of {state.mesh_file}: {', '.join(unknown)}",
                                 param_hint="--direct")
    asyncio.run(run_control_plane(state, profile_for, tracing, Path(watch) if watch else None, found, direct))


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True), required=False)
@state_dir_option()
@output_option
def apply(file: str | None, state_dir: StateDir, output: str) -> None:
    """Push a changed mesh.yaml (FILE, `-` for standard input; default: as `config validate` finds it)
    to the running mesh's control plane, live.

    The control plane checks the file as `meshctl config validate` does (the same errors, naming FILE;
    exit 2), builds every sidecar's configuration, refuses the whole change if one does not build, and
    answers once every connected sidecar accepted (ACK) or refused (NACK) it. Exit 0 when all accepted,
    1 when one refused or did not answer in time. Ports, the collector and the set of services stay as
    `meshctl up` planned them.

    Data (-o json|yaml): changed (services whose configuration changed), nodes (one per connected sidecar:
    node, service, changed, outcome: acked | pending | nacked: <Envoy's error>), build_seconds.
    """
    source, text = _read(file)
    info = RuntimeInfo.read(state_dir)
    if info is None or not info.control_plane:
        _check_here(text, source)  # a bad file: its errors before the news that nothing runs
        raise StateError(str(state_dir.root / "runtime.json"), "no control plane runs from this state dir: start "
                         "one with `meshctl up` (sidecar plane); a mesh without one takes a changed mesh.yaml at "
                         "the next `meshctl up`")
    url = f"http://{info.control_plane['admin']}/apply"
    try:
        result = _post(url, text.encode(), source)
    except _NoAnswer as exc:
        _check_here(text, source)
        why = f"the control plane at {url} did not answer ({exc}): is the mesh up? `meshctl status`"
        raise MeshError(why) from None
    if output != "text":
        emit(result, output)
    else:
        _print(result)
    refused = [n for n in result["nodes"] if n["outcome"] != "acked"]
    if refused:
        raise click.exceptions.Exit(1)


def _read(file: str | None) -> tuple[str, str]:
    """(the name errors give the file, its text)."""
    if file == "-":
        source = "<stdin>"
    elif file is not None:
        source = str(Path(file))
    else:  # the rule `config validate` follows
        from aivo_mesh.meshfile import find_mesh_file

        source = str(find_mesh_file(None))
    try:
        return source, sys.stdin.read() if file == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError.single(source, "", f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError.single(source, "", f"cannot read: {exc}") from None


def _check_here(text: str, source: str) -> None:
    """Where no control plane answers: check the file locally, so a bad one still gets its located errors."""
    from aivo_mesh.config.loader import parse_mesh

    parse_mesh(text, source)


class _NoAnswer(Exception):
    """The control plane's admin endpoint did not answer (refused, reset, timed out)."""


def _post(url: str, body: bytes, source: str) -> dict[str, Any]:
    import urllib.error
    import urllib.request

    # The file's name as UTF-8 bytes (HTTP headers are Latin-1): the control plane names it in its errors.
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"content-type": "application/yaml",
                                          "x-mesh-file": source.encode("utf-8").decode("latin-1")})
    try:
        with urllib.request.urlopen(req, timeout=APPLY_HTTP_TIMEOUT) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        try:
            answer = json.loads(exc.read())
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            answer = {"error": exc.reason}
        if exc.code == 400 and answer.get("issues"):
            raise _invalid(source, answer) from None
        # 409: it loaded but cannot be applied live; another 400: a body the endpoint refused (not UTF-8).
        # Either way the user must act.
        why = answer.get("text") or answer.get("error")
        raise ConfigError.single(source, "", f"the control plane refused it: {why}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise _NoAnswer(str(getattr(exc, "reason", exc))) from None


def _invalid(source: str, answer: dict[str, Any]) -> ConfigError:
    """The control plane's 400 for a file that does not load: its ConfigError, whose text (`text`, naming
    the file from x-mesh-file) `meshctl` prints as `config validate` would, `error: <text>`, exit 2."""
    issues = [ConfigIssue(str(i.get("path") or ""), str(i.get("message")), i.get("line"))
              for i in answer["issues"] if isinstance(i, dict)]
    exc = ConfigError(source, issues)
    text = answer.get("text")
    if isinstance(text, str) and text:
        exc.args = (text,)  # verbatim, whatever this version would render
    return exc


def _print(result: dict[str, Any]) -> None:
    from rich.table import Table

    console = rich_console()
    changed = result["changed"]
    console.print(f"built in {result['build_seconds'] * 1000:.0f} ms; changed: {', '.join(changed) or 'nothing'}")
    table = Table(title="nodes")
    for col in ("service", "node", "changed", "outcome"):
        table.add_column(col)
    for n in result["nodes"]:
        style = "green" if n["outcome"] == "acked" else "red"
        table.add_row(n["service"], n["node"], "yes" if n["changed"] else "no",
                      f"[{style}]{n['outcome']}[/{style}]")
    console.print(table if result["nodes"] else "no node is connected")


CONFIG_KINDS = ("listeners", "routes", "clusters", "endpoints", "secrets")


@cli.command(name="config-dump")
@click.argument("service", shell_complete=complete_services)
@click.option("--type", "kinds", type=click.Choice(CONFIG_KINDS), multiple=True,
              help="only these kinds (repeat the option; default: all)")
@state_dir_option()
@output_option
def config_dump(service: str, kinds: tuple[str, ...], state_dir: StateDir, output: str) -> None:
    """What SERVICE's node holds now, by its own account, like `istioctl proxy-config`: each listener,
    route configuration, cluster, endpoint assignment and secret, where it came from (static: the
    bootstrap; dynamic: the control plane), its state and version. On the sidecar plane that is Envoy's
    admin /config_dump; on the proxyless plane the service's own admin /config_dump, in the same shape
    (what its ADS stream holds: its peers' listeners, routes, clusters and endpoints, and its server's
    listener).

    Data (-o json|yaml): service, admin (sidecar_admin on the sidecar plane), and per kind a list of
    {name, source, state, version, last_updated, resource}; a private key never appears (none is sent,
    Envoy redacts them, and this command drops any).
    """
    from rich.table import Table

    from aivo_mesh.runtime.status import node_config

    info = RuntimeInfo.read(state_dir)
    if info is None or service not in info.services:
        raise StateError(str(state_dir.root / "runtime.json"), f"no running node of {service!r} here: "
                         "`meshctl status` lists what runs")
    ep = info.services[service]
    admin = ep.sidecar_admin or (ep.admin if info.control_plane else None)
    if not admin:
        raise StateError(str(state_dir.root / "runtime.json"), f"{service} runs without a sidecar or a control "
                         f"plane (the {info.plane} plane): its configuration is mesh.yaml (`meshctl config show`)")
    what = "sidecar admin" if ep.sidecar_admin else "admin endpoint"
    try:
        held = node_config(admin, kinds or CONFIG_KINDS)
    except (OSError, ValueError) as exc:
        raise MeshError(f"{service}'s {what} at {admin} did not answer ({exc}): `meshctl status`") from None
    data = {"service": service, **({"sidecar_admin": admin} if ep.sidecar_admin else {"admin": admin}), **held}
    if output != "text":
        emit(data, output)
        return
    console = rich_console()
    for kind, items in held.items():
        table = Table(title=f"{service}: {kind}")
        for col in ("name", "source", "state", "version", "last updated"):
            table.add_column(col)
        for item in items:
            table.add_row(item["name"], item["source"], item["state"], item["version"] or "-",
                          item["last_updated"] or "-")
        console.print(table if items else f"{service}: no {kind}")
