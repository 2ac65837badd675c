"""The per-process admin endpoint: a tiny HTTP/1.1 server on loopback, shaped like Envoy's admin API.

    admin = AdminServer(source, metrics, host="127.0.0.1", port=9101)
    port = await admin.start()
    ...
    await admin.stop()

    GET  /                                         index of the endpoints (JSON)
    GET  /ready                                    200 "LIVE" or 503 "NOT_READY" (text)
    GET  /stats[?format=json|text][&filter=RE]     counters and gauges of MeshMetrics, flattened
    GET  /metrics, /stats/prometheus               Prometheus text format 0.0.4
    GET  /clusters                                 targets, endpoints, health, ejection state
    GET  /circuit_breakers                         breaker state and counts per target service
    GET  /certs                                    this process's certificate (no key material)
    POST /clusters/<service>/circuit_breakers/reset   close that target's breaker (aivo-mesh only:
                                                      an Envoy sidecar answers 404 to this path)

Only stdlib asyncio: one request per connection (`Connection: close`), Content-Length bodies only.
It binds loopback unless `allow_remote=True`: it is unauthenticated and can reset breakers.
Garbage gets a 400, a client slower than `request_timeout` a 408, and past `max_connections` a 503.
Responses never echo the request's query or headers, and echo a path segment only once validated
(the service name of a reset that names no target: 404); data from the source passes through
`logs.redact`, so a key that looks like a credential is masked.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from aivo_mesh.errors import MeshError
from aivo_mesh.telemetry.logs import redact
from aivo_mesh.telemetry.metrics import MeshMetrics

__all__ = ["PROMETHEUS_CONTENT_TYPE", "AdminServer", "AdminSource", "is_loopback"]

log = logging.getLogger(__name__)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"

MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
MAX_TARGET_CHARS = 2048
LINGER_SECONDS = 0.5

REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 413: "Content Too Large", 415: "Unsupported Media Type",
           421: "Misdirected Request", 500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
           503: "Service Unavailable"}

ENDPOINTS: dict[str, str] = {
    "GET /": "this index",
    "GET /ready": "200 LIVE when the process is ready to serve, else 503",
    "GET /stats": "counters and gauges as JSON; ?format=text for 'name: value' lines; ?filter=<regex>",
    "GET /metrics": "Prometheus text exposition (also /stats/prometheus)",
    "GET /clusters": "target services, their endpoints, health and outlier ejection state",
    "GET /circuit_breakers": "circuit breaker state and counts per target service",
    "GET /certs": "this process's certificate: SPIFFE ID, DNS names, notAfter, seconds left",
    "POST /clusters/<service>/circuit_breakers/reset": "force the breaker of <service> back to closed",
}

_METHOD_RE = re.compile(r"^[A-Z]{1,16}$")
_HEADER_NAME_RE = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_RESET_RE = re.compile(r"^/clusters/([^/]+)/circuit_breakers/reset/?$")
_SERVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class AdminSource(Protocol):
    """What the admin endpoint shows and may change. MeshClient/MeshServer implement it; every
    method is called on the event loop and must be quick and non-blocking. Return plain JSON data
    (str, int, float, bool, None, lists, dicts) and never key material."""

    def clusters(self) -> list[dict[str, Any]]:
        """One entry per target service, as `Target.cluster()` makes it, e.g.
        {"service": "auth-svc", "endpoints": [{"endpoint": "127.0.0.1:50061", "healthy": true,
         "ejected": false, "ejected_until": null, "consecutive_failures": 0, "times_ejected": 0,
         "connectivity": "READY"}], ...}."""
        ...

    def circuit_breakers(self) -> dict[str, dict[str, Any]]:
        """Target service -> {"state": "closed"|"open"|"half_open", "failures": n, "rejected": n, ...}."""
        ...

    def reset_circuit_breaker(self, service: str) -> bool:
        """Close the breaker of `service`; False when there is no such target."""
        ...

    def ready(self) -> bool:
        """True when the process serves (server SERVING / client channels ready)."""
        ...

    def identity(self) -> dict[str, Any]:
        """{"spiffe_id", "dns_names", "not_after" (ISO 8601), "seconds_left", "serial", "spki_pin"}."""
        ...


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes = b""


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON_CONTENT_TYPE
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        head = [f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Unknown')}",
                f"Content-Type: {self.content_type}",
                f"Content-Length: {len(self.body)}",
                "Connection: close",
                "Cache-Control: no-store",
                "X-Content-Type-Options: nosniff",
                *(f"{k}: {v}" for k, v in self.headers.items())]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + self.body


def json_response(status: int, obj: Any, **headers: str) -> Response:
    body = (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
    return Response(status, body, JSON_CONTENT_TYPE, dict(headers))


def text_response(status: int, text: str, content_type: str = TEXT_CONTENT_TYPE, **headers: str) -> Response:
    return Response(status, text.encode(), content_type, dict(headers))


def error_response(status: int, message: str, **headers: str) -> Response:
    return json_response(status, {"error": message}, **headers)


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One request from `reader`; None when the client closed without sending anything."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise HttpError(400, "incomplete request head") from None
    except asyncio.LimitOverrunError:
        raise HttpError(400, f"request head larger than {MAX_HEAD_BYTES} bytes") from None
    lines = head[:-4].split(b"\r\n")
    try:
        request_line = lines[0].decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "request line is not ASCII") from None
    parts = request_line.split(" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not _METHOD_RE.match(method):
        raise HttpError(400, "malformed method")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpError(400, "unsupported HTTP version")
    if not target.startswith("/") or len(target) > MAX_TARGET_CHARS or any(c.isspace() for c in target):
        raise HttpError(400, "malformed request target")
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        name, sep, value = raw.partition(b":")
        if not sep or not _HEADER_NAME_RE.match(name):
            raise HttpError(400, "malformed header line")
        headers[name.decode("ascii").lower()] = value.strip().decode("latin-1")
    if "transfer-encoding" in headers:
        raise HttpError(501, "Transfer-Encoding is not supported; send Content-Length")
    body = b""
    length_text = headers.get("content-length")
    if length_text is not None:
        if not length_text.isdigit():
            raise HttpError(400, "malformed Content-Length")
        length = int(length_text)
        if length > MAX_BODY_BYTES:
            raise HttpError(413, f"body larger than {MAX_BODY_BYTES} bytes")
        try:
            body = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise HttpError(400, "body shorter than Content-Length") from None
    split = urlsplit(target)
    query = parse_qs(split.query, keep_blank_values=True)
    return Request(method, unquote(split.path), query, headers, body)


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then discard what the client still sends (briefly): closing a socket with unread
    input makes the kernel send a RST that can destroy the response before the client reads it."""
    if reader.at_eof() or not writer.can_write_eof():
        return
    writer.write_eof()
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(LINGER_SECONDS):
            while await reader.read(MAX_BODY_BYTES):
                pass


def _number(value: float) -> int | float:
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def _flat_name(name: str, labels: dict[str, str]) -> str:
    if not labels:
        return name
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


class AdminServer:
    """The admin HTTP endpoint of one process. `port=0` picks a free port; `start()` returns it."""

    def __init__(self, source: AdminSource, metrics: MeshMetrics, host: str = "127.0.0.1", port: int = 0, *,
                 allow_remote: bool = False, request_timeout: float = 5.0, max_connections: int = 32,
                 extra_routes: Mapping[tuple[str, str], Callable[[Request], Awaitable[Response]]] | None = None
                 ) -> None:
        if not allow_remote and not is_loopback(host):
            raise MeshError(f"admin endpoint: refusing to listen on {host!r}: it is unauthenticated and can "
                            "reset circuit breakers; bind 127.0.0.1 or pass allow_remote=True")
        self.source = source
        self.metrics = metrics
        self.host = host
        self.port = port
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # (method, path) -> an async handler: what a process adds to the standard endpoints (the control
        # plane's /apply, which waits for the nodes' answers).
        self._extra = dict(extra_routes or {})
        self._routes: dict[str, Callable[[Request], Response]] = {
            "/": self._index,
            "/ready": self._ready,
            "/stats": self._stats,
            "/stats/prometheus": self._metrics,
            "/metrics": self._metrics,
            "/clusters": self._clusters,
            "/circuit_breakers": self._circuit_breakers,
            "/certs": self._certs,
        }

    @property
    def open_connections(self) -> int:
        """Connections being served right now (what `max_connections` bounds)."""
        return len(self._tasks)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> int:
        if self._server is not None:
            return self.port
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_HEAD_BYTES)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("admin endpoint listening on %s", self.url)
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> AdminServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- connection handling ------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            response = await self._respond(reader)
            if response is not None:
                writer.write(response.encode())
                async with asyncio.timeout(self.request_timeout):
                    await writer.drain()
                await _linger(reader, writer)
        except (ConnectionError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): this task is the top of the connection, nothing awaits its result
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> Response | None:
        if len(self._tasks) > self.max_connections:
            return error_response(503, "too many admin connections")
        try:
            async with asyncio.timeout(self.request_timeout):
                request = await read_request(reader)
        except HttpError as exc:
            return error_response(exc.status, exc.message)
        except TimeoutError:
            return error_response(408, f"request not received within {self.request_timeout:g}s")
        if request is None:
            return None
        try:
            extra = self._extra.get((request.method, request.path.rstrip("/") or "/"))
            if extra is not None:
                return await extra(request)
            return self.dispatch(request)
        except HttpError as exc:
            return error_response(exc.status, exc.message)
        except Exception:
            log.exception("admin endpoint: %s %s failed", request.method, request.path)
            return error_response(500, "internal error (see the process log)")

    # -- routing --------------------------------------------------------------------------------------

    def dispatch(self, request: Request) -> Response:
        reset = _RESET_RE.match(request.path)
        if reset is not None:
            if request.method != "POST":
                return error_response(405, f"Method {request.method} not allowed, POST required", Allow="POST")
            return self._reset(reset.group(1))
        path = request.path.rstrip("/") or "/"
        route = self._routes.get(path)
        if route is None:
            return json_response(404, {"error": "no such admin endpoint", "endpoints": ENDPOINTS})
        if request.method != "GET":
            return error_response(405, f"Method {request.method} not allowed, GET required", Allow="GET")
        return route(request)

    def _index(self, request: Request) -> Response:
        return json_response(200, {"endpoints": ENDPOINTS})

    def _ready(self, request: Request) -> Response:
        try:
            ready = bool(self.source.ready())
        except Exception:
            log.exception("admin endpoint: readiness check failed")
            ready = False
        return text_response(200, "LIVE\n") if ready else text_response(503, "NOT_READY\n")

    def _stats(self, request: Request) -> Response:
        fmt = request.query.get("format", ["json"])[-1]
        if fmt not in ("json", "text", "prometheus"):
            raise HttpError(400, "format must be json, text or prometheus")
        if fmt == "prometheus":
            return self._metrics(request)
        pattern: re.Pattern[str] | None = None
        if "filter" in request.query:
            try:
                pattern = re.compile(request.query["filter"][-1])
            except re.error:
                raise HttpError(400, "filter is not a valid regular expression") from None
        stats = []
        for name, labels, value in self.metrics.samples():
            flat = _flat_name(name, labels)
            if pattern is None or pattern.search(flat):
                stats.append({"name": flat, "metric": name, "labels": labels, "value": _number(value)})
        stats.sort(key=lambda s: str(s["name"]))
        if fmt == "text":
            return text_response(200, "".join(f"{s['name']}: {s['value']}\n" for s in stats))
        return json_response(200, {"stats": stats})

    def _metrics(self, request: Request) -> Response:
        return Response(200, self.metrics.render(), PROMETHEUS_CONTENT_TYPE)

    def _clusters(self, request: Request) -> Response:
        return json_response(200, {"clusters": redact("clusters", self.source.clusters())})

    def _circuit_breakers(self, request: Request) -> Response:
        return json_response(200, {"circuit_breakers": redact("circuit_breakers", self.source.circuit_breakers())})

    def _certs(self, request: Request) -> Response:
        return json_response(200, {"certificates": [redact("certificate", self.source.identity())]})

    def _reset(self, service: str) -> Response:
        if not _SERVICE_RE.match(service):
            return error_response(404, "unknown service")
        if not self.source.reset_circuit_breaker(service):
            return error_response(404, f"unknown service {service!r}: not a target of this process")
        state = self.source.circuit_breakers().get(service, {})
        return json_response(200, {"service": service, "reset": True,
                                   "circuit_breaker": redact("circuit_breaker", state)})
