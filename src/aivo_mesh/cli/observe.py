"""`meshctl status`, `meshctl routes SERVICE`, `meshctl edges`: golden metrics of the local mesh.

Each reads the observer `meshctl up` runs (runtime/observer.py, its address in runtime.json); without one
(a mesh started otherwise, or the observer not answering) it samples the processes itself, twice,
`--sample` seconds apart, and says so in "source". `-o json|yaml` prints one schema per command whatever
the mesh's state (docs/schemas/{status,routes,edges}.schema.json).

Exit codes of `status` (as `linkerd check`): 0 every service healthy (or nothing runs), 1 a service is
unhealthy or unreachable, 2 bad input (flags, an unreadable state dir).
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from aivo_mesh.cli._complete import complete_services
from aivo_mesh.cli._output import emit, json_alias_option, output_option, pick_output, rich_console
from aivo_mesh.cli._root import cli
from aivo_mesh.cli._state import state_dir_option
from aivo_mesh.runtime.state import StateDir

if TYPE_CHECKING:
    from rich.console import RenderableType

    from aivo_mesh.runtime.state import RuntimeInfo

SPAN = 900.0  # the observer's ring: the longest window it answers

EXIT_UNHEALTHY = 1


def _window(ctx: click.Context | None, param: click.Parameter | None, value: str) -> float:
    from aivo_mesh.telemetry.golden import parse_window

    try:
        seconds = parse_window(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if seconds > SPAN:
        raise click.BadParameter(f"{value}: the observer keeps {SPAN / 60:g} minutes")
    return seconds


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed((
        state_dir_option(),
        click.option("--window", callback=_window, default="1m", show_default=True, metavar="DURATION",
                     help="the span the figures cover (60, 30s, 1m, 15m), from the observer's samples"),
        click.option("--sample", type=click.FloatRange(min=0), default=2.0, show_default=True,
                     help="without an observer: seconds between the two samples taken (0: no rates)"),
        click.option("--interval", "legacy_interval", type=click.FloatRange(min=0), default=None, hidden=True,
                     help="former name of --sample"),
        click.option("--watch", is_flag=True, help="refresh in place every --refresh seconds until Ctrl-C"),
        click.option("--refresh", type=click.FloatRange(min=0.5), default=2.0, show_default=True,
                     help="seconds between two refreshes with --watch"),
        output_option,
    )):
        f = option(f)
    return f


def mesh_document(state: StateDir, window: float, sample: float) -> dict[str, Any]:
    """The mesh document (aivo-mesh/mesh/v1) of the mesh running from `state`, plus `state_dir` and
    `processes` (the processes of a `meshctl demo` run, which has no supervisor nor observer)."""
    import asyncio

    from aivo_mesh.runtime.observer import MESH_SCHEMA, direct_document
    from aivo_mesh.runtime.state import RuntimeInfo

    info = RuntimeInfo.read(state)
    extra: dict[str, Any] = {"state_dir": str(state.root), "processes": []}
    if info is None:
        from aivo_mesh.cli.serve import demo_processes

        procs = asyncio.run(demo_processes(state))
        source = f"the processes of a `meshctl demo` run from {state.root}" if procs else \
            f"nothing running from {state.root}"
        return {"schema": MESH_SCHEMA, "generated_at": round(time.time(), 3), "window_seconds": window,
                "interval_seconds": None, "plane": None, "source": source, "services": [], "routes": [],
                "edges": [], "control_plane": None, **extra, "processes": procs}
    doc = _from_observer(info, window)
    if doc is None:
        doc = asyncio.run(direct_document(state, window, sample))
    return {**doc, **extra}


def _from_observer(info: RuntimeInfo, window: float) -> dict[str, Any] | None:
    if not info.observer:
        return None
    # fresh=1: the observer takes a round now, so health, processes and the control plane's view are as
    # they are (right after `meshctl up`, its last round may have been taken while the mesh started).
    query = urllib.parse.urlencode({"window": f"{window:g}", "fresh": "1"})
    url = f"http://{info.observer}/api/v1/mesh?{query}"
    try:
        with urllib.request.urlopen(url, timeout=15) as resp:
            doc = json.loads(resp.read())
    except (OSError, ValueError):
        return None  # starting, or stopped: sample directly
    return doc if isinstance(doc, dict) and doc.get("schema") else None


def _watch(render: Callable[[], tuple[RenderableType | dict[str, Any], int]], output: str, watch: bool,
           refresh: float) -> int:
    """Render once, or (`watch`) again every `refresh` seconds until Ctrl-C; returns the last exit code."""
    shown, code = render()
    if not watch:
        _show(shown, output)
        return code
    if output != "text":  # one document per refresh
        try:
            while True:
                _show(shown, output)
                time.sleep(refresh)
                shown, code = render()
        except KeyboardInterrupt:
            return code
    from rich.live import Live

    console = rich_console()
    try:
        with Live(shown, console=console, auto_refresh=False) as live:  # type: ignore[arg-type]  # text: a renderable
            while True:
                time.sleep(refresh)
                shown, code = render()
                live.update(shown, refresh=True)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        pass
    return code


def _show(shown: Any, output: str) -> None:
    if output == "text":
        rich_console().print(shown)
    else:
        emit(shown, output)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _rate(g: dict[str, Any]) -> str:
    return "-" if g["success_rate"] is None else f"{g['success_rate'] * 100:.2f}%"


def _golden_cells(g: dict[str, Any]) -> list[str]:
    return [f"{g['rps']:.1f}", _rate(g), _ms(g["p50_ms"]), _ms(g["p95_ms"]), _ms(g["p99_ms"])]


GOLDEN_COLUMNS = ("rps", "success", "p50 ms", "p95 ms", "p99 ms")


def _table(title: str, columns: list[str], rows: list[list[str]], caption: str) -> Any:
    from rich.table import Table

    table = Table(title=title, caption=caption, caption_justify="left")
    for col in columns:
        table.add_column(col, justify="right" if col in GOLDEN_COLUMNS or col == "requests" else "left")
    for row in rows:
        table.add_row(*row)
    return table


@cli.command()
@_common
@json_alias_option
def status(state_dir: StateDir, window: float, sample: float, legacy_interval: float | None, watch: bool,
           refresh: float, output: str, as_json: bool) -> None:
    """Health, golden metrics (server and client side), upstreams and breakers of each service.

    Exit status: 0 when every service is healthy (or nothing runs), 1 when one is unhealthy or
    unreachable. Data (-o json|yaml): the observer's mesh document (aivo-mesh/mesh/v1) plus `state_dir`
    and `processes` (a `meshctl demo` run's processes; empty otherwise)."""
    output = pick_output(output, as_json)
    sample = sample if legacy_interval is None else legacy_interval

    def render() -> tuple[Any, int]:
        doc = mesh_document(state_dir, window, sample)
        code = EXIT_UNHEALTHY if _unhealthy(doc) else 0
        return (doc if output != "text" else _status_text(doc)), code

    raise click.exceptions.Exit(_watch(render, output, watch, refresh))


def _unhealthy(doc: dict[str, Any]) -> bool:
    if any(s["health"] != "healthy" for s in doc["services"]):
        return True
    return any(p["role"] == "service" and p["health"] != "SERVING" for p in doc["processes"])


def _status_text(doc: dict[str, Any]) -> Any:
    from rich.console import Group

    if doc["plane"] is None:
        if not doc["processes"]:
            return f"nothing running from {doc['state_dir']}"
        rows = [[p["name"], p["role"], str(p["pid"]), p["address"], p["process"], p["health"],
                 ", ".join(f"{k}={v}" for k, v in p["breakers"].items()) or "-",
                 ", ".join(f"{k}: {v}" for k, v in p["upstreams"].items()) or "-"] for p in doc["processes"]]
        return _table(f"aivo-mesh status ({doc['state_dir']})",
                      ["name", "role", "pid", "address", "process", "health", "breakers", "upstreams"], rows,
                      doc["source"])
    has_xds = doc["control_plane"] is not None
    rows = []
    for s in doc["services"]:
        p = s["process"]
        process = p["state"] + (f" ({p['restarts']} restarts)" if p["restarts"] else "")
        if p.get("sidecar"):
            process += f"\nsidecar {p['sidecar']}"
        ups = "\n".join(f"{u['service']}: {u['state']}" + (f", breaker {u['breaker']}" if u["breaker"] else "")
                        for u in s["upstreams"]) or "-"
        limited = s["rate_limited"]["window_count"]
        rows.append([s["name"], process, s["health"], *([p.get("xds") or "-"] if has_xds else []),
                     *_golden_cells(s["server"]),
                     f"{s['client']['rps']:.1f} / {_rate(s['client'])}", ups, str(limited) if limited else "-"])
    columns = ["service", "process", "health", *(["xds"] if has_xds else []), *GOLDEN_COLUMNS,
               "client rps / success", "upstreams", "rate-limited"]
    table = _table(f"aivo-mesh status: {doc['plane']} plane, last {doc['window_seconds']:g} s ({doc['state_dir']})",
                   columns, rows, f"server side (calls each service answered); source: {doc['source']}")
    cp = doc["control_plane"]
    if cp is None:
        return table
    line = f"control plane {cp['address']} (admin {cp['admin']}): {cp['process']}; " \
           f"{cp['synced']}/{len(doc['services'])} synced"
    nacks = [f"{n['group']}: NACK {n['last_nack']['message']}" for n in cp["nodes"] if n["last_nack"]]
    return Group(table, line, *nacks)


@cli.command()
@click.argument("service", shell_complete=complete_services)
@_common
def routes(service: str, state_dir: StateDir, window: float, sample: float, legacy_interval: float | None,
           watch: bool, refresh: float, output: str) -> None:
    """Golden metrics per route (gRPC method) of SERVICE: as it answered them (server) and as its callers
    in the mesh saw them (client).

    Data (-o json|yaml): {"schema": "aivo-mesh/routes/v1", "service", "generated_at", "window_seconds",
    "source", "routes": [{"service", "route", "side", "golden"}]}."""
    sample = sample if legacy_interval is None else legacy_interval

    def render() -> tuple[Any, int]:
        doc = mesh_document(state_dir, window, sample)
        if doc["services"] and service not in {s["name"] for s in doc["services"]}:
            raise click.BadParameter(f"{service!r} is not a service of the mesh running from {state_dir.root}",
                                     param_hint="SERVICE")
        data = {"schema": "aivo-mesh/routes/v1", "service": service, "generated_at": doc["generated_at"],
                "window_seconds": doc["window_seconds"], "source": doc["source"],
                "routes": [r for r in doc["routes"] if r["service"] == service]}
        if output != "text":
            return data, 0
        rows = [[r["route"], r["side"], str(r["golden"]["requests"]), *_golden_cells(r["golden"])]
                for r in data["routes"]]
        return _table(f"routes of {service}, last {data['window_seconds']:g} s",
                      ["route", "side", "requests", *GOLDEN_COLUMNS], rows,
                      f"server: as {service} answered; client: as its callers saw them; source: {data['source']}"), 0

    raise click.exceptions.Exit(_watch(render, output, watch, refresh))


@cli.command()
@_common
def edges(state_dir: StateDir, window: float, sample: float, legacy_interval: float | None, watch: bool,
          refresh: float, output: str) -> None:
    """Who calls whom: per caller and target, the caller's identity (SPIFFE ID) and golden metrics of its
    calls, as the caller counted them.

    Data (-o json|yaml): {"schema": "aivo-mesh/edges/v1", "generated_at", "window_seconds", "source",
    "edges": [{"from", "to", "caller_identity", "golden"}]}."""
    sample = sample if legacy_interval is None else legacy_interval

    def render() -> tuple[Any, int]:
        doc = mesh_document(state_dir, window, sample)
        data = {"schema": "aivo-mesh/edges/v1", "generated_at": doc["generated_at"],
                "window_seconds": doc["window_seconds"], "source": doc["source"], "edges": doc["edges"]}
        if output != "text":
            return data, 0
        rows = [[e["from"], e["to"], e["caller_identity"] or "-", str(e["golden"]["requests"]),
                 *_golden_cells(e["golden"])] for e in data["edges"]]
        return _table(f"edges, last {data['window_seconds']:g} s",
                      ["from", "to", "caller identity", "requests", *GOLDEN_COLUMNS], rows,
                      f"source: {data['source']}"), 0

    raise click.exceptions.Exit(_watch(render, output, watch, refresh))
