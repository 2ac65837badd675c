"""`meshctl up`, `down`, `traces` (and the hidden `collector` / `_supervise` process entry points)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from aivo_mesh.cli._complete import complete_services
from aivo_mesh.cli._output import emit, output_option, rich_console
from aivo_mesh.cli._root import PORT, cli
from aivo_mesh.cli._state import state_dir_option
from aivo_mesh.errors import MeshError
from aivo_mesh.runtime.state import DEFAULT_STATE_DIR, HEALTHY_WITHIN, StateDir, pid_alive

if TYPE_CHECKING:
    import subprocess

    from rich.console import Console


@cli.command()
@click.option("--plane", type=click.Choice(["sidecar", "proxyless"]), default="sidecar", show_default=True)
@click.option("--config", type=click.Path(dir_okay=False), default=None, help="mesh.yaml")
@state_dir_option(starts=DEFAULT_STATE_DIR)
@click.option("--free-ports/--mesh-ports", default=False, show_default=True,
              help="free loopback ports instead of mesh.yaml's (tests, a second mesh)")
@click.option("--otlp-port", type=PORT, default=None, help="trace collector port (default 4317, or free)")
@click.option("--observer-port", type=PORT, default=None,
              help="the observer's loopback HTTP API (golden metrics; default: a free port)")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="seconds to wait for all-healthy")
@click.option("--watch", is_flag=True,
              help="push each saved change of mesh.yaml to the running mesh (as `meshctl apply`)")
def up(plane: str, config: str | None, state_dir: StateDir, free_ports: bool, otlp_port: int | None,
       observer_port: int | None, timeout: float | None, watch: bool) -> None:
    """Start the mesh on this machine and return once every service is healthy.

    A control plane runs too: every Envoy (sidecar plane) or service (proxyless plane) takes its
    configuration over ADS, and `meshctl apply` (or `--watch`) changes it live."""
    import asyncio
    import subprocess

    from aivo_mesh.config.loader import find_mesh_file
    from aivo_mesh.runtime.health import all_serving, wait_supervised
    from aivo_mesh.runtime.local import free_port, preflight, prepare
    from aivo_mesh.runtime.mesh import LocalTracing, plan

    state = state_dir
    source = find_mesh_file(config).resolve() if watch else None
    if state.running():
        raise MeshError(f"a mesh is already running from {state.root} (meshctl down --state-dir {state.root})")
    console = rich_console()
    started = time.monotonic()
    port = otlp_port or (free_port() if free_ports else 4317)
    observer = observer_port or free_port()
    tracing = LocalTracing(port)
    mesh = prepare(state, config, free_ports, transform=tracing)
    forward = ["--forward-to", tracing.forward_to] if tracing.forward_to else []
    forward += ["--watch", str(source)] if source else []
    # The supervisor's own plan: the files its processes load and the ports they listen on.
    preflight(state, mesh, *plan(state, mesh, plane, port, watch=source,  # type: ignore[arg-type]  # click.Choice
                                 observer_port=observer))
    log = state.log_file("supervisor")
    proc: subprocess.Popen[bytes] | None = None
    try:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "aivo_mesh", "_supervise", "--state-dir", str(state.root), "--plane", plane,
                 "--otlp-port", str(port), "--observer-port", str(observer), *forward], stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        if tracing.forward_to:
            console.print(f"spans: {state.root / 'traces.jsonl'} and forwarded to {tracing.forward_to}")
        limit = timeout or HEALTHY_WITHIN[plane]  # type: ignore[index]  # plane: click.Choice
        with console.status(f"starting the {plane} mesh ({len(mesh.service_names)} services)...") as status:
            report = asyncio.run(wait_supervised(state, proc.poll, limit, status.update))
    except KeyboardInterrupt:
        # The supervisor runs in its own session, so Ctrl-C reaches only us: stop what we started.
        _interrupted(state, console, proc)
        raise click.exceptions.Exit(130) from None
    elapsed = time.monotonic() - started
    if not all_serving(report):
        console.print(f"[red]not healthy within {limit:.0f}s:[/red]")
        for name, st in report.items():
            console.print(f"  {name}: {st}")
        console.print(f"logs: {state.root / 'logs'}")
        _down(state, console, started=proc)
        raise click.exceptions.Exit(1)
    console.print(f"[green]{plane} mesh up: {len(report)} services healthy in {elapsed:.1f}s[/green] "
                  f"(state {state.root}; `meshctl status`, `meshctl traces`, `meshctl down`)")
    _print_endpoints(console, state)


def _print_endpoints(console: Console, state: StateDir) -> None:
    """Where the mesh's own helper processes listen (runtime.json)."""
    from rich.table import Table

    from aivo_mesh.runtime.mesh import RuntimeInfo

    info = RuntimeInfo.read(state)
    if info is None:
        return
    table = Table(title="mesh processes", title_justify="left")
    table.add_column("process")
    table.add_column("address")
    table.add_column("what")
    table.add_row("collector", info.collector or "-", "OTLP traces (meshctl traces)")
    if info.observer:
        table.add_row("observer", f"http://{info.observer}/api/v1/mesh", "golden metrics (meshctl status/routes/edges)")
    if info.control_plane:
        table.add_row("control-plane", info.control_plane["address"], f"xDS (admin {info.control_plane['admin']})")
    console.print(table)
    if info.observer:
        from aivo_mesh.telemetry.dashboard import dashboard_url

        console.print(f"dashboard: {dashboard_url(info.observer)}", highlight=False, soft_wrap=True)


def _interrupted(state: StateDir, console: Console, proc: subprocess.Popen[bytes] | None) -> None:
    console.print(f"interrupted: stopping what `meshctl up` started from {state.root} ...")
    try:
        _down(state, console, started=proc)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted again: processes may still be running; stop them with "
                      f"`meshctl down --state-dir {state.root}`[/yellow]")


@cli.command()
@state_dir_option()
def down(state_dir: StateDir) -> None:
    """Stop everything `meshctl up` (or an interrupted `meshctl demo`) started from the state dir, by pid."""
    _down(state_dir, rich_console())


def _down(state: StateDir, console: Console, grace: float = 10.0,
          started: subprocess.Popen[bytes] | None = None) -> None:
    """Stop the supervisor, then any recorded process it left. `started`: the supervisor, when it is our
    own child (`up` giving up): waited on as a child, since an unreaped one still looks alive by pid."""
    import signal
    import subprocess

    from aivo_mesh.runtime.mesh import RuntimeInfo, restarts_file, running_supervisor, supervisor_pid_file
    from aivo_mesh.runtime.sockets import remove_socket_dir
    from aivo_mesh.runtime.supervisor import stop_recorded

    info = RuntimeInfo.read(state)  # read first: the supervisor removes it on its way out
    if started is not None and started.poll() is None:
        pid: int | None = started.pid
        started.terminate()
        try:
            started.wait(grace)
        except subprocess.TimeoutExpired:
            started.kill()
            started.wait()
    elif (pid := running_supervisor(state)) is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    # Whatever the supervisor could not stop (it was killed, or crashed) goes by its recorded pid. A
    # processes.json that cannot be trusted raises StateError here, saying how to find them by hand.
    leftovers = stop_recorded(state.read_processes(), grace=5.0)
    state.clear_processes()
    info = info or RuntimeInfo.read(state)  # a supervisor stopped while starting may have written it since
    for f in (supervisor_pid_file(state), state.root / "runtime.json", restarts_file(state)):
        f.unlink(missing_ok=True)  # also when the supervisor could not clean up after itself
    if info is not None and info.sockets:
        remove_socket_dir(Path(info.sockets))
    stopped = "supervisor" if pid else "nothing was running"
    console.print(f"mesh down ({stopped}{'; also stopped ' + ', '.join(leftovers) if leftovers else ''}) "
                  f"from {state.root}")


@cli.command()
@state_dir_option()
@click.option("--last", type=click.IntRange(min=1), default=5, show_default=True, help="how many recent traces")
@click.option("--width", type=click.IntRange(min=1), default=40, show_default=True,
              help="width of the timing bars")
@click.option("--service", default=None, shell_complete=complete_services,
              help="only traces through this service (its app or its sidecar)")
@click.option("--errors", is_flag=True, help="only traces with a failed span")
@click.option("--trace-id", default=None, help="only the trace whose id starts with this")
@output_option
def traces(state_dir: StateDir, last: int, width: int, service: str | None, errors: bool,
           trace_id: str | None, output: str) -> None:
    """Recent traces of the local mesh as text waterfalls (app and Envoy spans); -o json|yaml: their spans."""
    from aivo_mesh.runtime.collector import SpanLog, read_stats, recent_traces, stats_line, traces_document
    from aivo_mesh.telemetry.otlp_receiver import render_waterfall

    state = state_dir
    log = SpanLog(state.root / "traces.jsonl")
    if output != "text":
        emit(traces_document(log.path, last, service=service, errors=errors, trace_id=trace_id), output)
        return
    stats = read_stats(log.path)
    filtered = service is not None or errors or trace_id is not None
    found = recent_traces(log, last, service=service, errors=errors, trace_id=trace_id)
    if stats and (stats.get("truncated") or any((stats.get("dropped") or {}).values())):
        # Said first: the traces below may lack spans.
        click.echo(stats_line(stats))
        click.echo()
    if not found:
        what = "matching traces" if filtered else "traces yet"
        click.echo(f"no {what} in {state.root / 'traces.jsonl'}")
        return
    for t in found:
        click.echo(render_waterfall(t, width=width))
        click.echo()


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def byte_size(ctx: click.Context | None, param: click.Parameter | None, value: str) -> int:
    """A size in bytes: 1048576, 512KiB, 64MiB, 1GiB (K, M, G, KB, MB, GB are powers of 1024 too)."""
    text = str(value).strip().lower().removesuffix("ib").removesuffix("b")
    digits = text.rstrip("kmg")
    unit = text[len(digits):]
    if not digits.isdigit() or unit not in _SIZE_UNITS or int(digits) == 0:
        raise click.BadParameter(f"{value!r}: expected a positive size such as 1048576, 512KiB or 64MiB")
    return int(digits) * _SIZE_UNITS[unit]


@cli.command(hidden=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=PORT, default=4317, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True)
@click.option("--forward-to", default=None, help="also forward every Export to this OTLP endpoint (Jaeger)")
@click.option("--max-bytes", callback=byte_size, default="64MiB", metavar="SIZE", show_default=True,
              help="memory for held spans (estimated); the oldest leave first")
@click.option("--max-span-bytes", callback=byte_size, default="256KiB", metavar="SIZE", show_default=True,
              help="a bigger span has its string values cut to 1024 characters, and is dropped if still bigger")
@click.option("--forward-max-bytes", callback=byte_size, default="32MiB", metavar="SIZE", show_default=True,
              help="Export requests waiting to be forwarded; beyond, a request is not forwarded")
def collector(host: str, port: int, out: str, forward_to: str | None, max_bytes: int, max_span_bytes: int,
              forward_max_bytes: int) -> None:
    """Run the local OTLP trace collector (started by `meshctl up`)."""
    import asyncio

    from aivo_mesh.runtime.collector import run_collector
    from aivo_mesh.telemetry.logs import configure_logging

    configure_logging("INFO", json=True)
    asyncio.run(run_collector(host, port, Path(out), forward_to, max_bytes=max_bytes, max_span_bytes=max_span_bytes,
                              forward_max_bytes=forward_max_bytes))


@cli.command(name="_supervise", hidden=True)
@click.option("--state-dir", type=click.Path(file_okay=False), required=True)
@click.option("--plane", type=click.Choice(["sidecar", "proxyless"]), required=True)
@click.option("--otlp-port", type=PORT, required=True)
@click.option("--observer-port", type=PORT, default=None, help="run the observer on this loopback port")
@click.option("--forward-to", default=None, help="the collector forwards every span to this OTLP endpoint")
@click.option("--watch", type=click.Path(dir_okay=False), default=None, help="the control plane applies its changes")
def supervise_cmd(state_dir: str, plane: str, otlp_port: int, observer_port: int | None, forward_to: str | None,
                  watch: str | None) -> None:
    import asyncio

    from aivo_mesh.runtime.mesh import supervise
    from aivo_mesh.telemetry.logs import configure_logging

    configure_logging("INFO", json=True)
    asyncio.run(supervise(StateDir(state_dir), plane, otlp_port, forward_to,  # type: ignore[arg-type]  # Choice
                          Path(watch) if watch else None, observer_port=observer_port))


@cli.command(hidden=True)
@state_dir_option()
@click.option("--host", default="127.0.0.1", show_default=True, help="a loopback address")
@click.option("--port", type=PORT, default=0, show_default=True, help="0: a free port")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="seconds between two samples")
def observer(state_dir: StateDir, host: str, port: int, interval: float) -> None:
    """Run the observer of a running mesh (started by `meshctl up`): golden metrics over HTTP."""
    import asyncio

    from aivo_mesh.runtime.observer import run_observer
    from aivo_mesh.telemetry.logs import configure_logging

    configure_logging("INFO", json=True)
    asyncio.run(run_observer(state_dir, host, port, interval))
