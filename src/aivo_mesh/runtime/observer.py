"""The observer: one process of a local mesh (`meshctl up`) that samples every process's own metrics and
serves golden metrics over a loopback HTTP API (docs/telemetry.md, "The observer").

Every `interval` seconds it reads each service's admin `/metrics` (MeshServer/MeshClient), each sidecar's
`/stats?format=json` (rate-limit refusals, circuit-breaker gauges) and `/clusters?format=json` (hosts), or
a proxyless service's admin `/clusters` (endpoints, breaker, retry budget), probes grpc.health.v1 with the
`mesh-client` identity, and reads the control plane's `/xds/status` and `/xds/config` where one runs. The
cumulative counters go into a ring of 15 minutes (telemetry/golden.py computes from it); health,
processes and upstreams are the last round's.

    GET  /api/v1/mesh?window=60[&fresh=1]            the mesh document (aivo-mesh/mesh/v1); fresh=1: sampled now
    GET  /api/v1/history?service=S[&route=R][&side=server]&window=900&step=10
    GET  /api/v1/traces?errors=1&limit=20[&trace_id=PREFIX]   recent traces, as `meshctl traces -o json`
    POST /api/v1/breakers/reset {"service": caller, "upstream": target}
                                                     the caller's admin breaker reset, answered as it answers
    GET  /, /dashboard.js, /dashboard.css, /favicon.svg   the web dashboard (telemetry/dashboard.py)

A POST must come from this server's own origin as JSON (dashboard.same_origin_json): another site's page
open in the same browser cannot reset a breaker.

Without an observer (`meshctl status` against a mesh started otherwise) `direct_document` takes two rounds
`sample` seconds apart in the calling process: the same document, said so in "source".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aivo_mesh.runtime.state import RuntimeInfo, ServiceEndpoints, StateDir, pid_alive
from aivo_mesh.runtime.status import envoy_hosts, peer_breakers, xds_sync
from aivo_mesh.telemetry.admin import (
    MAX_HEAD_BYTES,
    HttpError,
    Request,
    Response,
    error_response,
    json_response,
    read_request,
)
from aivo_mesh.telemetry.dashboard import dashboard_asset, same_origin_json
from aivo_mesh.telemetry.golden import (
    MeshSample,
    ProcessSample,
    SampleRing,
    edges,
    envoy_rate_limited,
    envoy_values,
    history,
    parse_metrics,
    parse_window,
    routes,
    service_golden,
    window_deltas,
)
from aivo_mesh.xds.groups import is_proxyless_group, node_group

if TYPE_CHECKING:
    from aivo_mesh.client import MeshClient

log = logging.getLogger("aivo_mesh.observer")

MESH_SCHEMA = "aivo-mesh/mesh/v1"
HISTORY_SCHEMA = "aivo-mesh/history/v1"
DEFAULT_INTERVAL = 2.0
DEFAULT_WINDOW = 60.0
SPAN = 900.0  # what the ring keeps: the longest window and history the API answers
MAX_POINTS = 1000  # history points per answer
READ_TIMEOUT = 1.5  # per admin read: a round must stay near `interval` even when a process hangs
# A running process whose health probe goes unanswered this many rounds in a row is unreachable: one slow
# answer on a loaded machine is not an outage (Envoy's and Kubernetes' probes have thresholds too). A
# process that is gone is unreachable at once.
UNREACHABLE_AFTER = 2
# A service's first probe opens its connection (the TLS handshake and the check of the server's certificate
# come first): on a loaded machine that may take longer than a round's reads.
FIRST_PROBE_TIMEOUT = 5.0
# The sidecar stats the observer reads (Envoy's filter is a regex over stat names): rate-limit refusals
# and circuit-breaker gauges. Golden figures come from the apps' own /metrics on both planes.
ENVOY_FILTER = r"http_local_rate_limit\.rate_limited|circuit_breakers\.default\."


def _get(url: str, timeout: float = READ_TIMEOUT) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


def _health(status: str, running: bool) -> str:
    """grpc.health.v1's answer as the mesh document says it."""
    if not running or status == "UNREACHABLE":
        return "unreachable"
    return "healthy" if status == "SERVING" else "unhealthy"


def _upstream_state(hosts: dict[str, str]) -> str:
    if hosts and all(f == "healthy" for f in hosts.values()):
        return "healthy"
    return "ejected" if any("outlier" in f or f == "ejected" for f in hosts.values()) else "unhealthy"


def proxyless_upstreams(clusters: Any, breakers: dict[str, str]) -> list[dict[str, Any]]:
    """Upstream entries from a MeshClient's admin `/clusters` document (parsed)."""
    out = []
    for c in clusters.get("clusters", []):
        hosts = {str(e.get("endpoint")): "ejected" if e.get("ejected") else
                 "healthy" if e.get("healthy") else "unhealthy" for e in c.get("endpoints", [])}
        budget = c.get("retry_budget")
        service = str(c.get("service"))
        out.append({"service": service, "state": _upstream_state(hosts),
                    "breaker": _breaker(c.get("breaker") or breakers.get(service)), "hosts": hosts,
                    # `balance`: retries the budget still allows now; used + balance is its current limit.
                    "retry_budget": {"used": int(budget.get("retries", 0)),
                                     "limit": int(budget.get("retries", 0)) + int(budget.get("balance", 0))}
                    if isinstance(budget, dict) else None})
    return sorted(out, key=lambda u: u["service"])


def _breaker(state: Any) -> str | None:
    text = str(state).lower().replace("-", "_") if state is not None else ""
    return text if text in ("closed", "open", "half_open") else "open" if text == "forced_open" else None


def sidecar_upstreams(hosts: dict[str, dict[str, str]], envoy_breakers: dict[str, str],
                      app_breakers: dict[str, str]) -> list[dict[str, Any]]:
    """Upstream entries of a service behind a sidecar: its Envoy's hosts per peer cluster; the breaker is
    the app's where it keeps one, else "open" while Envoy refuses calls over a circuit_breakers threshold."""
    out = []
    for peer, flags in hosts.items():
        breaker = _breaker(app_breakers.get(peer))
        if breaker is None and peer in envoy_breakers:
            breaker = "closed" if envoy_breakers[peer] == "closed" else "open"
        out.append({"service": peer, "state": _upstream_state(flags), "breaker": breaker, "hosts": flags,
                    "retry_budget": None})
    return out


@dataclass
class ServiceView:
    """One service as the last round saw it (what has no window)."""

    health: str = "unreachable"
    process: dict[str, Any] = field(default_factory=dict)
    upstreams: list[dict[str, Any]] = field(default_factory=list)


class Observer:
    """Samples the mesh running from `state` (its runtime.json) and answers the API's documents. `clock`:
    unix seconds (injected so tests can place samples)."""

    def __init__(self, state: StateDir, info: RuntimeInfo, identities: dict[str, str], *,
                 interval: float = DEFAULT_INTERVAL, span: float = SPAN,
                 clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.info = info
        self.identities = identities
        self.interval = interval
        self.clock = clock
        self.ring = SampleRing(span, interval)
        self.views: dict[str, ServiceView] = {name: ServiceView() for name in info.services}
        self.missed: dict[str, int] = {}  # health probes unanswered in a row, per service
        self.last_began = 0.0  # when the last finished round began (what it read is at least that recent)
        self.control_plane: dict[str, Any] | None = None
        self.mode = f"observer sampling every {interval:g} s"

    @classmethod
    def for_state(cls, state: StateDir, **kwargs: Any) -> Observer:
        """The observer of the mesh running from `state`. MeshError-free: raises ValueError when no
        runtime.json is there."""
        from aivo_mesh.config.loader import load_mesh

        info = RuntimeInfo.read(state)
        if info is None:
            raise ValueError(f"no running mesh in {state.root} (runtime.json is missing)")
        mesh = load_mesh(state.mesh_file)
        return cls(state, info, {name: mesh.spiffe_id(name) for name in mesh.service_names}, **kwargs)

    @property
    def source(self) -> str:
        services = sum(1 for ep in self.info.services.values() if ep.admin)
        envoys = sum(1 for ep in self.info.services.values() if ep.sidecar_admin)
        parts = [f"admin /metrics of {services} services"]
        if envoys:
            parts.append(f"/stats of {envoys} Envoys")
        if self.info.control_plane:
            parts.append("the control plane's /xds/status")
        return f"{', '.join(parts)} ({self.mode})"

    # -- sampling --------------------------------------------------------------------------------------

    async def sample(self, client: MeshClient) -> MeshSample:
        """One round: every service read at once; the cumulative counts go into the ring."""
        from aivo_mesh.runtime.health import check

        began = self.clock()
        records = {r.name: r for r in self.state.read_processes()}
        try:
            restarts: dict[str, int] = json.loads((self.state.root / "restarts.json").read_text())
        except (OSError, ValueError):
            restarts = {}
        names = list(self.info.services)
        reads = await asyncio.gather(*(asyncio.to_thread(self._read_service, name, ep)
                                       for name, ep in self.info.services.items()))
        healths = await asyncio.gather(*(
            check(client, name, timeout=READ_TIMEOUT if name in self.missed else FIRST_PROBE_TIMEOUT)
            for name in names))
        sync: dict[str, str] = {}
        if self.info.control_plane:
            sync = await asyncio.to_thread(self._read_control_plane, records)
        at = self.clock()
        samples: dict[str, ProcessSample] = {}
        for name, (sample, upstreams, sidecar), status in zip(names, reads, healths, strict=True):
            rec = records.get(name)
            running = rec is not None and pid_alive(rec.pid)
            if sample is not None:
                samples[name] = sample
            health = _health(status, running)
            if health == "unreachable" and running:
                self.missed[name] = self.missed.get(name, 0) + 1
                if self.missed[name] < UNREACHABLE_AFTER:
                    health = self.views[name].health  # what the last round said, until the threshold
            else:
                self.missed[name] = 0
            self.views[name] = ServiceView(
                health=health,
                process={"state": "running" if running else "down", "pid": rec.pid if rec else None,
                         "restarts": restarts.get(name, 0) + restarts.get(f"{name}-envoy", 0),
                         "sidecar": sidecar,
                         "xds": sync.get(node_group(name, self.info.plane)) if self.info.control_plane else None},
                upstreams=upstreams)
        taken = MeshSample(at=at, services=samples)
        self.ring.add(taken)
        self.last_began = began
        return taken

    async def recheck(self, client: MeshClient) -> None:
        """Probe again, now, each running service the last round did not find healthy, and take a success at
        once: a service that came up since (right after `meshctl up`, whose processes start with the observer)
        is not reported down for up to a round. A failure changes nothing: the rounds judge those."""
        from aivo_mesh.runtime.health import check

        names = [n for n, v in self.views.items() if v.health != "healthy" and v.process.get("state") == "running"]
        if not names:
            return
        statuses = await asyncio.gather(*(check(client, name, timeout=READ_TIMEOUT) for name in names))
        for name, status in zip(names, statuses, strict=True):
            if status == "SERVING":
                self.views[name] = dataclasses.replace(self.views[name], health="healthy")
                self.missed[name] = 0

    def _read_service(self, name: str, ep: ServiceEndpoints) -> tuple[ProcessSample | None, list[dict[str, Any]],
                                                                         str | None]:
        sample: ProcessSample | None = None
        app_breakers: dict[str, str] = {}
        upstreams: list[dict[str, Any]] = []
        if ep.admin:
            with contextlib.suppress(OSError, ValueError):
                sample = parse_metrics(_get(f"http://{ep.admin}/metrics"))
            with contextlib.suppress(OSError, ValueError, KeyError, AttributeError):
                app_breakers = {n: str(b.get("state")) for n, b in
                                json.loads(_get(f"http://{ep.admin}/circuit_breakers"))["circuit_breakers"].items()}
                if not ep.sidecar_admin:
                    upstreams = proxyless_upstreams(json.loads(_get(f"http://{ep.admin}/clusters")), app_breakers)
        if not ep.sidecar_admin:
            return sample, upstreams, None
        sidecar = "unreachable"
        try:
            sidecar = _get(f"http://{ep.sidecar_admin}/ready").strip() or "?"
        except urllib.error.HTTPError as exc:  # 503 while Envoy initializes: its body says the state
            sidecar = exc.read().decode(errors="replace").strip() or str(exc.code)
        except OSError:
            return sample, upstreams, sidecar
        with contextlib.suppress(OSError, ValueError):
            query = urllib.parse.urlencode({"format": "json", "filter": ENVOY_FILTER})
            values = envoy_values(json.loads(_get(f"http://{ep.sidecar_admin}/stats?{query}")))
            limited = envoy_rate_limited(values)
            breakers = peer_breakers("".join(f"{k}: {int(v)}\n" for k, v in values.items()))
            upstreams = sidecar_upstreams(envoy_hosts(ep.sidecar_admin), breakers, app_breakers)
            if sample is not None:
                sample = ProcessSample(calls=sample.calls, rate_limited=sample.rate_limited + limited)
        return sample, upstreams, sidecar

    def _read_control_plane(self, records: dict[str, Any]) -> dict[str, str]:
        assert self.info.control_plane is not None
        where = self.info.control_plane
        rec = next((r for r in records.values() if r.role == "control-plane"), None)
        doc: dict[str, Any] = {"address": where["address"], "admin": where["admin"],
                               "process": "running" if rec is not None and pid_alive(rec.pid) else "down",
                               "synced": 0, "nodes": []}
        try:
            status = json.loads(_get(f"http://{where['admin']}/xds/status"))
            config = json.loads(_get(f"http://{where['admin']}/xds/config"))
            sync = xds_sync(status, config)
        except (OSError, ValueError, AttributeError):
            self.control_plane = doc
            return {}
        proxyless = self.info.plane == "proxyless"
        doc["synced"] = sum(1 for g, v in sync.items() if is_proxyless_group(g) == proxyless and v.startswith("synced"))
        doc["nodes"] = [_node(n, config) for n in status.get("nodes", []) if n.get("connected")]
        self.control_plane = doc
        return sync

    # -- documents -------------------------------------------------------------------------------------

    def document(self, window: float = DEFAULT_WINDOW) -> dict[str, Any]:
        """The mesh document over the last `window` seconds."""
        now = self.clock()
        deltas = window_deltas(self.ring.samples(), now - window, now)
        limited = deltas.rate_limited
        services = []
        for name in self.info.services:
            view = self.views[name]
            services.append({"name": name, "plane": self.info.plane, "health": view.health,
                             "process": view.process,
                             "server": service_golden(deltas, name, "server"),
                             "client": service_golden(deltas, name, "client"),
                             "upstreams": view.upstreams,
                             "rate_limited": {"window_count": round(limited.get(name, 0.0))}})
        return {"schema": MESH_SCHEMA, "generated_at": round(now, 3), "window_seconds": window,
                "interval_seconds": self.interval, "plane": self.info.plane, "source": self.source,
                "services": services, "routes": routes(deltas), "edges": edges(deltas, self.identities),
                "control_plane": self.control_plane}

    def history_document(self, service: str, window: float, step: float, route: str | None = None,
                         side: str = "server") -> dict[str, Any]:
        now = self.clock()
        start = now - window
        points = history(self.ring.samples(), service, start, now, step, route=route, side=side)
        return {"schema": HISTORY_SCHEMA, "service": service, "route": route, "side": side,
                "window_seconds": window, "step_seconds": step, "points": points}


def _node(node: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    group = str(node.get("group"))
    want: dict[str, str] = dict(config.get(group, {}))
    version = want.pop("version", None)
    types = node.get("types", {})
    # As xds_sync judges it: every type the node subscribed to holds the snapshot's version of it.
    acked = all(want.get(t) in (None, ts.get("acked")) for t, ts in types.items())
    nacks = [(t, ts["nack"]) for t, ts in sorted(types.items()) if isinstance(ts.get("nack"), dict)]
    last_nack = None
    if nacks:
        type_, nack = nacks[-1]
        last_nack = {"version": nack.get("version"), "message": f"{type_}: {nack.get('error', '')}",
                     "at": nack.get("at")}
    return {"node": node.get("node"), "group": group, "acked_version": version if acked else None,
            "last_nack": last_nack}


async def direct_document(state: StateDir, window: float, sample: float) -> dict[str, Any]:
    """The mesh document from two rounds `sample` seconds apart in this process (no observer runs);
    `window` is what the caller asked for, reported as the sampled span."""
    from aivo_mesh.client import MeshClient, MeshConfig
    from aivo_mesh.config.loader import load_mesh
    from aivo_mesh.runtime.mesh import mesh_for_clients

    observer = Observer.for_state(state, interval=max(sample, 0.001), span=max(sample * 4, 1.0))
    observer.mode = f"two direct samples {sample:g} s apart" if sample > 0 else "one direct sample, no rates"
    view = mesh_for_clients(load_mesh(state.mesh_file), observer.info)
    async with MeshClient(MeshConfig.for_identity("mesh-client", state.certs, view), health_checks=False,
                          reload_interval=None) as client:
        await observer.sample(client)
        if sample > 0:
            await asyncio.sleep(sample)
            await observer.sample(client)
    doc = observer.document(window=max(sample, 0.001) + 1.0)
    doc["window_seconds"] = sample
    return doc


# -- the HTTP API ----------------------------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[Response]]


def _one(request: Request, name: str, default: str | None = None) -> str | None:
    values = request.query.get(name)
    return values[-1] if values else default


def _window(request: Request, name: str, default: float, limit: float) -> float:
    try:
        seconds = parse_window(_one(request, name) or default)
    except ValueError as exc:
        raise HttpError(400, str(exc)) from None
    if seconds > limit:
        raise HttpError(400, f"{name} {seconds:g} s: the observer keeps {limit:g} s")
    return seconds


class ObserverServer:
    """The observer's loopback HTTP API over `observer` (started with `start`, sampling with `run`)."""

    def __init__(self, observer: Observer, client: MeshClient, host: str = "127.0.0.1", port: int = 0) -> None:
        from aivo_mesh.telemetry.admin import is_loopback

        if not is_loopback(host):
            raise ValueError(f"the observer binds loopback only, not {host}")
        self.observer = observer
        self.client = client
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._round = asyncio.Lock()  # one sampling round at a time (the loop's, or a request's `_fresh`)
        self.routes: dict[tuple[str, str], Handler] = {
            ("GET", "/api/v1/mesh"): self._mesh,
            ("GET", "/api/v1/history"): self._history,
            ("GET", "/api/v1/traces"): self._traces,
            ("POST", "/api/v1/breakers/reset"): self._reset,
        }

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_HEAD_BYTES)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def run(self, stop: asyncio.Event) -> None:
        """Sample every interval until `stop` is set (a round that fails is logged and skipped)."""
        while not stop.is_set():
            started = time.monotonic()
            try:
                async with self._round:
                    await self.observer.sample(self.client)
            except Exception:
                log.exception("observer: a sampling round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, self.observer.interval - (time.monotonic() - started)))

    async def _fresh(self, now: bool = False) -> bool:
        """A round now if asked (`fresh=1`: `meshctl status` wants the mesh as it is), or if the last one is
        older than two intervals (a loaded machine, or rounds slowed by services still starting): what the
        API answers is never much older than the interval says. True when the answer comes from a round
        that began after the request."""
        asked = self.observer.clock()
        limit = 0.0 if now else 2 * self.observer.interval
        if asked - self.observer.last_began <= limit:
            return False
        async with self._round:  # a round that began after the request (while this one waited) will do
            if self.observer.last_began < asked - limit:
                await self.observer.sample(self.client)
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            response = await self._respond(reader)
            if response is not None:
                writer.write(response.encode())
                await writer.drain()
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> Response | None:
        try:
            async with asyncio.timeout(5.0):
                request = await read_request(reader)
            if request is None:
                return None
            path = request.path.rstrip("/") or "/"
            asset = dashboard_asset(request.method, request.path)
            if asset is not None:
                return asset
            if request.method == "POST":
                same_origin_json(request, self.host, self.port)
            handler = self.routes.get((request.method, path))
            if handler is None:
                known = sorted({p for _, p in self.routes})
                if path in known:
                    return error_response(405, f"{request.method} not allowed on {path}")
                return json_response(404, {"error": "no such endpoint", "endpoints": known})
            return await handler(request)
        except HttpError as exc:
            return error_response(exc.status, exc.message)
        except TimeoutError:
            return error_response(408, "request not received within 5 s")
        except Exception:
            log.exception("observer: request failed")
            return error_response(500, "internal error (see the observer's log)")

    async def _mesh(self, request: Request) -> Response:
        if not len(self.observer.ring):  # no health nor counts yet: callers sample directly meanwhile
            raise HttpError(503, "the observer has not finished its first round yet")
        if not await self._fresh(now=(_one(request, "fresh") or "0") not in ("0", "false", "")):
            await self.observer.recheck(self.client)  # a round just taken probed every service already
        return json_response(200, self.observer.document(_window(request, "window", DEFAULT_WINDOW,
                                                                 self.observer.ring.span)))

    async def _history(self, request: Request) -> Response:
        service = _one(request, "service")
        if service not in self.observer.info.services:
            raise HttpError(400, f"service: expected one of {', '.join(self.observer.info.services)}")
        side = _one(request, "side", "server")
        if side not in ("server", "client"):
            raise HttpError(400, "side: expected server or client")
        window = _window(request, "window", SPAN, self.observer.ring.span)
        step = _window(request, "step", 10.0, window)
        step = max(step, window / MAX_POINTS, self.observer.interval)
        return json_response(200, self.observer.history_document(service, window, step,
                                                                 route=_one(request, "route"), side=side))

    async def _traces(self, request: Request) -> Response:
        from aivo_mesh.runtime.collector import traces_document

        errors = (_one(request, "errors") or "0") not in ("0", "false", "")
        try:
            limit = int(_one(request, "limit") or 20)
        except ValueError:
            raise HttpError(400, "limit: expected a number") from None
        if not 1 <= limit <= 1000:
            raise HttpError(400, "limit: expected 1..1000")
        doc = await asyncio.to_thread(traces_document, self.observer.state.root / "traces.jsonl", limit,
                                      service=_one(request, "service"), errors=errors,
                                      trace_id=_one(request, "trace_id"))
        return json_response(200, doc)

    async def _reset(self, request: Request) -> Response:
        try:
            body = json.loads(request.body or b"{}")
            service, upstream = str(body["service"]), str(body["upstream"])
        except (ValueError, KeyError, TypeError):
            raise HttpError(400, 'expected a JSON body {"service": caller, "upstream": target}') from None
        ep = self.observer.info.services.get(service)
        if ep is None or not ep.admin:
            raise HttpError(404, f"unknown service {service!r} (or it has no admin endpoint)")
        url = f"http://{ep.admin}/clusters/{urllib.parse.quote(upstream, safe='')}/circuit_breakers/reset"

        def post() -> tuple[int, Any]:
            req = urllib.request.Request(url, data=b"", method="POST")
            try:
                with urllib.request.urlopen(req, timeout=READ_TIMEOUT) as resp:
                    return int(resp.status), json.loads(resp.read() or b"{}")
            except urllib.error.HTTPError as exc:
                return int(exc.code), json.loads(exc.read() or b"{}")

        try:
            status, answer = await asyncio.to_thread(post)
        except (OSError, ValueError) as exc:
            raise HttpError(502, f"{service}'s admin endpoint did not answer: {exc}") from None
        return json_response(status, answer)


async def run_observer(state: StateDir, host: str, port: int, interval: float = DEFAULT_INTERVAL) -> None:
    """The body of `meshctl observer` (started by `meshctl up`): sample and serve until SIGTERM."""
    from aivo_mesh.client import MeshClient, MeshConfig
    from aivo_mesh.config.loader import load_mesh
    from aivo_mesh.runtime.mesh import mesh_for_clients

    observer = Observer.for_state(state, interval=interval)
    view = mesh_for_clients(load_mesh(state.mesh_file), observer.info)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with MeshClient(MeshConfig.for_identity("mesh-client", state.certs, view), health_checks=False,
                          reload_interval=None) as client:
        server = ObserverServer(observer, client, host, port)
        bound = await server.start()
        print(f"observer on http://{host}:{bound}/api/v1/mesh, sampling every {interval:g} s", flush=True)
        try:
            await server.run(stop)
        finally:
            await server.stop()

