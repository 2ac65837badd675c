"""`meshctl consul register|deregister|services`: the mesh's services in a Consul agent, by hand.

    meshctl consul register                       every service of mesh.yaml at its host:port
    meshctl consul register auth-svc --address 10.0.0.5 --port 50051
    meshctl consul deregister auth-svc            every instance of auth-svc this agent holds
    meshctl consul deregister --id auth-svc-10.0.0.5-50051
    meshctl consul services [-o json|yaml]        the catalog: service -> tags

The agent is `--consul HOST:PORT` (default `$CONSUL_HTTP_ADDR`, else 127.0.0.1:8500) and the ACL
token `--token` (default `$CONSUL_HTTP_TOKEN`). Registration bodies are exactly those a serving
process sends (`agent_service_definition`), so a hand registration and a self-registration of the
same instance share one ID and replace each other.

The Consul client (python-consul, requests) and aivo_mesh.discovery are imported by the commands and
callbacks that talk to an agent, not when meshctl starts.
"""

from __future__ import annotations

import os
from typing import Any

import click

from aivo_mesh.cli._complete import complete_services
from aivo_mesh.cli._output import emit, json_alias_option, output_option, pick_output
from aivo_mesh.cli._root import PORT, cli

# aivo_mesh.discovery.consul.DEFAULT_ADDRESS, for the options' help without importing the Consul client
# (tests/test_layering.py checks that they agree).
DEFAULT_AGENT = "127.0.0.1:8500"


def _checked(address: str, hint: str) -> str:
    from aivo_mesh.discovery.consul import parse_address

    try:
        parse_address(address)
    except ValueError as exc:  # a usage error (exit 2), not a traceback; the message hides credentials
        raise click.BadParameter(str(exc), param_hint=hint) from None
    return address


def consul_address(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """click callback for a `--consul HOST:PORT` option (also `meshctl serve --consul`)."""
    return None if value is None else _checked(value, "'--consul'")


def agent_address(consul_addr: str | None) -> str:
    """The agent to talk to: `--consul`, else $CONSUL_HTTP_ADDR, else the local default; checked (a
    usage error that hides credentials)."""
    return _checked(consul_addr or os.environ.get("CONSUL_HTTP_ADDR") or DEFAULT_AGENT,
                    "'--consul' / $CONSUL_HTTP_ADDR")


_consul_opt = click.option("--consul", "consul_addr", metavar="HOST:PORT", default=None,
                           help=f"Consul agent (default: $CONSUL_HTTP_ADDR or {DEFAULT_AGENT})")
_token_opt = click.option("--token", default=None, envvar="CONSUL_HTTP_TOKEN", show_envvar=True,
                          help="ACL token")


@cli.group("consul")
def consul_group() -> None:
    """Register the mesh's services in a Consul agent, deregister them, list the catalog."""


@consul_group.command("register")
@click.argument("services", nargs=-1, shell_complete=complete_services)
@click.option("--config", type=click.Path(dir_okay=False), default=None, help="mesh.yaml")
@_consul_opt
@_token_opt
@click.option("--address", default=None, metavar="HOST",
              help="where the agent and callers reach the instance (default: the service's host in mesh.yaml)")
@click.option("--port", type=PORT, default=None,
              help="the instance's mTLS port (default: the service's port in mesh.yaml; one service only)")
@click.option("--no-tls", is_flag=True, help="plain gRPC health check (an --insecure local service)")
def register(services: tuple[str, ...], config: str | None, consul_addr: str | None, token: str | None,
             address: str | None, port: int | None, no_tls: bool) -> None:
    """Register SERVICES (default: every service of mesh.yaml) with a gRPC health check."""
    import asyncio

    from aivo_mesh.config.loader import load_mesh
    from aivo_mesh.discovery.consul_register import ConsulRegistration

    mesh = load_mesh(config)
    names = list(services) or list(mesh.service_names)
    unknown = [n for n in names if n not in mesh.service_names]
    if unknown:
        raise click.BadParameter(f"unknown service {unknown[0]!r}; mesh.yaml defines "
                                 f"{', '.join(mesh.service_names)}", param_hint="SERVICES")
    if port is not None and len(names) > 1:
        raise click.UsageError("--port applies to one service; name it (services listen on different ports)")
    reg = ConsulRegistration(agent_address(consul_addr), token=token)

    async def run() -> list[tuple[str, str, int, str]]:
        done = []
        for name in names:
            spec = mesh.service(name)
            host, p = address or spec.host, port or spec.port
            sid = await reg.register(mesh, name, address=host, port=p, use_tls=not no_tls)
            done.append((name, host, p, sid))
        return done

    for name, host, p, sid in asyncio.run(run()):
        click.echo(f"registered {sid} ({name} at {host}:{p})")


@consul_group.command("deregister")
@click.argument("services", nargs=-1, shell_complete=complete_services)
@_consul_opt
@_token_opt
@click.option("--id", "ids", multiple=True, metavar="SERVICE_ID", help="deregister this instance ID (repeatable)")
def deregister(services: tuple[str, ...], consul_addr: str | None, token: str | None, ids: tuple[str, ...]) -> None:
    """Deregister every instance of SERVICES held by the agent (and/or the given --id)."""
    if not services and not ids:
        raise click.UsageError("name at least one SERVICE or --id")
    import asyncio

    from aivo_mesh.discovery.consul_register import ConsulRegistration

    reg = ConsulRegistration(agent_address(consul_addr), token=token)

    async def run() -> tuple[list[str], list[str], list[str]]:
        targets = list(ids)
        empty: list[str] = []
        if services:
            held = await reg.agent_services()
            for name in services:
                found = sorted(sid for sid, entry in held.items() if entry.get("Service") == name)
                if not found:
                    empty.append(name)
                targets += [sid for sid in found if sid not in targets]
        removed: list[str] = []
        missing: list[str] = []
        for sid in targets:
            (removed if await reg.deregister(sid) else missing).append(sid)
        return removed, missing, empty

    removed, missing, empty = asyncio.run(run())
    for sid in removed:
        click.echo(f"deregistered {sid}")
    for name in empty:
        click.secho(f"no instance of {name} is registered with this agent", fg="yellow", err=True)
    for sid in missing:
        click.secho(f"unknown service ID {sid}", fg="yellow", err=True)
    if empty or missing:
        raise click.exceptions.Exit(1)


def catalog_services(address: str, token: str | None = None) -> dict[str, list[str]]:
    """`GET /v1/catalog/services`: service name -> tags."""
    import consul

    from aivo_mesh.discovery.consul import CONSUL_ERRORS, ConsulError, parse_address

    host, port, scheme = parse_address(address)
    try:
        _, services = consul.Consul(host=host, port=port, scheme=scheme, token=token).catalog.services()
    except CONSUL_ERRORS as e:
        raise ConsulError(f"Consul agent {scheme}://{host}:{port}: list services failed: "
                          f"{type(e).__name__}: {e}") from e
    return {str(k): list(v or []) for k, v in sorted((services or {}).items())}


@consul_group.command("services")
@_consul_opt
@_token_opt
@output_option
@json_alias_option
def services_cmd(consul_addr: str | None, token: str | None, output: str, as_json: bool) -> None:
    """List the services in the Consul catalog with their tags."""
    output = pick_output(output, as_json)
    address = agent_address(consul_addr)
    services: dict[str, Any] = catalog_services(address, token)
    if output != "text":
        emit({"agent": address, "services": [{"name": n, "tags": t} for n, t in services.items()]}, output)
        return
    if not services:
        click.echo("no services registered")
        return
    width = max(len(n) for n in services)
    for name, tags in services.items():
        click.echo(f"{name:<{width}}  {', '.join(tags)}")
