"""FakeConsulAgent: a FAKE of a small, documented part of the Consul agent HTTP API, for tests.

This is not Consul and does not try to be: no Raft, no gossip, no real health checking, one node.
It implements only what aivo-mesh uses, following the API docs
(https://developer.hashicorp.com/consul/api-docs/{agent/service,health,catalog,features/blocking}):

    PUT /v1/agent/service/register[?replace-existing-checks=true]   body: service definition JSON
    PUT /v1/agent/service/deregister/<id>                           404 "Unknown service ID" if absent
    GET /v1/health/service/<name>[?passing=1][&index=N&wait=D][&dc=X]
    GET /v1/catalog/services[?index=N&wait=D]                       {"name": ["tag", ...]}
    GET /v1/agent/services                                          {"id": {...}}
    GET /v1/status/leader                                           "127.0.0.1:8300"

Behaviour copied from the docs:
- Blocking queries: with `index=N`, the request is held while the answer's index is <= N, until
  `wait` (default 5m, max 10m, plus up to wait/16 of jitter) elapses; the answer carries
  `X-Consul-Index`. As in Consul, a query whose index is *ahead* of the server (after the index moved
  backwards) blocks for the whole wait and then answers with the lower index.
- The index of a health query is the last change (raft index) of that service; catalog/agent
  listings use the global index. Every change bumps the global index by one.
- New checks start `critical` unless the definition sets `Status` (Consul's default);
  `passing` filtering drops an instance if any of its checks (or the node's serfHealth) is not passing.
- A `dc` other than the fake's datacenter answers 500 "No path to datacenter"; with `acl_token` set,
  a request without that token (header `X-Consul-Token` or `?token=`) answers 403 "Permission denied".
- Field names of stored definitions are matched case-insensitively and with or without `_`, as
  Consul does (`Name`/`name`, `DeregisterCriticalServiceAfter`/`deregister_critical_service_after`).

Test knobs: `set_check_status(service_id, status)`, `add_instance(...)` (an instance registered on
another node), `reset_index(n)` (move the index backwards), `fail_next(count, status)` (inject
errors), `hold_answers(path_prefix)` (apply a request, hold its answer), `registrations` (raw
JSON bodies as received), `requests` (a log) and `wait_until(predicate, timeout)` (a
condition-variable wait, no polling).
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
CHECK_STATUSES = ("passing", "warning", "critical", "maintenance")
# Check kinds that need an Interval (C:agent/check: "Interval ... required if ... HTTP, TCP, UDP, gRPC").
_INTERVAL_KINDS = ("grpc", "http", "tcp", "udp", "h2ping", "args", "script")


def go_duration(text: str) -> float:
    """Seconds in a Go duration string ("30s", "1m30s", "250ms"); ValueError if malformed."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _norm(key: str) -> str:
    return key.replace("_", "").lower()


def field_of(d: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """Consul's decoder is case-insensitive and accepts snake_case: do the same."""
    want = _norm(name)
    for k, v in d.items():
        if _norm(k) == want:
            return v
    return default


@dataclass
class RequestRecord:
    """One request, logged on arrival; `status` is 0 until it is answered (e.g. a held query)."""

    method: str
    path: str
    query: dict[str, list[str]]
    token: str | None
    status: int = 0

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


@dataclass
class _Instance:
    id: str
    name: str
    address: str
    port: int
    tags: list[str]
    meta: dict[str, str]
    weights: dict[str, int]
    check_status: str | None  # None: no service check
    node: str
    node_address: str
    modify_index: int = 0


@dataclass
class _Failure:
    status: int
    body: str
    path_prefix: str


class FakeConsulAgent:
    """See the module docstring. Use as a context manager or call start()/stop()."""

    def __init__(self, *, datacenter: str = "dc1", node: str = "fake-node", node_address: str = "127.0.0.1",
                 acl_token: str | None = None) -> None:
        self.datacenter = datacenter
        self.node = node
        self.node_address = node_address
        self.acl_token = acl_token
        self.registrations: dict[str, dict[str, Any]] = {}
        self.register_params: dict[str, dict[str, list[str]]] = {}
        self.requests: list[RequestRecord] = []
        self._instances: dict[str, _Instance] = {}
        self._service_index: dict[str, int] = {}
        self._index = 1
        self._failures: list[_Failure] = []
        self._holds: list[tuple[str, threading.Event]] = []
        self._cond = threading.Condition()
        self._closing = False
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> FakeConsulAgent:
        agent = self

        class Handler(_Handler):
            fake = agent

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-consul", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()  # release held blocking queries
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeConsulAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- test knobs ------------------------------------------------------------------------------
    @property
    def index(self) -> int:
        with self._cond:
            return self._index

    def service_index(self, name: str) -> int:
        with self._cond:
            return self._service_index.get(name, self._index)

    def set_check_status(self, service_id: str, status: str) -> None:
        if status not in CHECK_STATUSES:
            raise ValueError(f"status must be one of {CHECK_STATUSES}")
        with self._cond:
            inst = self._instances[service_id]
            inst.check_status = status
            self._touch(inst.name)

    def add_instance(self, name: str, address: str, port: int, *, service_id: str | None = None,
                     status: str | None = "passing", node: str = "fake-node-2", node_address: str = "10.9.9.9",
                     tags: Iterable[str] = (), meta: Mapping[str, str] | None = None,
                     weights: Mapping[str, int] | None = None) -> str:
        """An instance as if registered through another node's agent (not in `registrations`)."""
        sid = service_id or f"{name}-{address}-{port}"
        with self._cond:
            self._instances[sid] = _Instance(sid, name, address, port, list(tags), dict(meta or {}),
                                             dict(weights or {"Passing": 1, "Warning": 1}), status, node,
                                             node_address)
            self._touch(name)
        return sid

    def remove_instance(self, service_id: str) -> None:
        with self._cond:
            inst = self._instances.pop(service_id)
            self.registrations.pop(service_id, None)
            self._touch(inst.name)

    def reset_index(self, index: int) -> None:
        """Move the raft index back to `index` (as after a snapshot restore); blocked queries stay
        blocked until their wait elapses, exactly as in Consul."""
        with self._cond:
            self._index = index
            for name in self._service_index:
                self._service_index[name] = index
            self._cond.notify_all()

    def fail_next(self, count: int, status: int = 500, body: str = "rpc error: fake failure",
                  path_prefix: str = "/v1/") -> None:
        """The next `count` requests under `path_prefix` answer `status` with `body`."""
        with self._cond:
            self._failures.extend(_Failure(status, body, path_prefix) for _ in range(count))

    def hold_answers(self, path_prefix: str) -> threading.Event:
        """Requests under `path_prefix` take effect at once, but their answers wait until the returned
        event is set (a reply slow to arrive, or lost in flight, after the agent applied it)."""
        release = threading.Event()
        with self._cond:
            self._holds.append((path_prefix, release))
        return release

    def clear_failures(self) -> None:
        with self._cond:
            self._failures.clear()

    def wait_until(self, predicate: Callable[[FakeConsulAgent], bool], timeout: float) -> bool:
        """Block until `predicate(self)` holds (re-checked after every request and state change)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def requests_to(self, path: str, method: str = "GET") -> list[RequestRecord]:
        with self._cond:
            return [r for r in self.requests if r.path == path and r.method == method]

    # -- state (call with self._cond held) -------------------------------------------------------
    def _touch(self, name: str) -> None:
        self._index += 1
        self._service_index[name] = self._index
        for inst in self._instances.values():
            if inst.name == name:
                inst.modify_index = self._index
        self._cond.notify_all()

    def _health_entry(self, inst: _Instance) -> dict[str, Any]:
        checks: list[dict[str, Any]] = [{
            "Node": inst.node, "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "passing",
            "ServiceID": "", "ServiceName": "", "Type": "",
        }]
        if inst.check_status is not None:
            checks.append({
                "Node": inst.node, "CheckID": f"service:{inst.id}", "Name": f"Service '{inst.name}' check",
                "Status": inst.check_status, "ServiceID": inst.id, "ServiceName": inst.name, "Type": "grpc",
            })
        return {
            "Node": {"ID": "", "Node": inst.node, "Address": inst.node_address, "Datacenter": self.datacenter,
                     "TaggedAddresses": {"lan": inst.node_address}, "Meta": {}},
            "Service": self._agent_service(inst),
            "Checks": checks,
        }

    def _agent_service(self, inst: _Instance) -> dict[str, Any]:
        return {"ID": inst.id, "Service": inst.name, "Tags": list(inst.tags), "Address": inst.address,
                "Port": inst.port, "Meta": dict(inst.meta), "Weights": dict(inst.weights),
                "EnableTagOverride": False, "Datacenter": self.datacenter,
                "CreateIndex": inst.modify_index, "ModifyIndex": inst.modify_index}

    def _register(self, body: dict[str, Any], query: dict[str, list[str]]) -> tuple[int, str]:
        name = field_of(body, "Name")
        if not isinstance(name, str) or not name:
            return 400, "Missing service name"
        sid = field_of(body, "ID") or name
        port = field_of(body, "Port", 0)
        if not isinstance(port, int) or isinstance(port, bool):
            return 400, "Request decode failed: Port must be a number"
        checks = list(field_of(body, "Checks") or [])
        if field_of(body, "Check"):
            checks.insert(0, field_of(body, "Check"))
        status: str | None = None
        for chk in checks:
            kinds = [k for k in _INTERVAL_KINDS if field_of(chk, k)]
            interval = field_of(chk, "Interval")
            if kinds and not interval:
                return 400, f"Invalid check: Interval must be > 0 for {kinds[0].upper()} checks"
            for key in ("Interval", "Timeout", "DeregisterCriticalServiceAfter"):
                value = field_of(chk, key)
                if value is not None:
                    try:
                        go_duration(str(value))
                    except ValueError:
                        return 400, f"Request decode failed: time: invalid duration {value!r}"
            if status != "critical":
                status = field_of(chk, "Status") or "critical"
        meta = field_of(body, "Meta") or {}
        with self._cond:
            self.registrations[sid] = body
            self.register_params[sid] = query
            self._instances[sid] = _Instance(
                sid, name, field_of(body, "Address") or "", port, list(field_of(body, "Tags") or []),
                dict(meta), dict(field_of(body, "Weights") or {"Passing": 1, "Warning": 1}), status,
                self.node, self.node_address)
            self._touch(name)
        return 200, ""

    def _deregister(self, sid: str) -> tuple[int, str]:
        with self._cond:
            inst = self._instances.get(sid)
            if inst is None or sid not in self.registrations:
                return 404, f'Unknown service ID "{sid}". Ensure that the service ID is passed, not the service name.'
            del self._instances[sid]
            del self.registrations[sid]
            self._touch(inst.name)
        return 200, ""

    def _block(self, index_of: Callable[[], int], query: dict[str, list[str]]) -> int:
        """Hold a blocking query; returns the index to answer with. Caller holds self._cond."""
        raw = (query.get("index") or [""])[0]
        if not raw:
            return index_of()
        wanted = int(raw)
        wait = min(go_duration(query["wait"][0]) if "wait" in query else DEFAULT_WAIT, MAX_WAIT)
        deadline = time.monotonic() + wait + random.uniform(0, wait / 16)
        while index_of() <= wanted and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)
        return index_of()


def _split_path(raw: str) -> tuple[str, dict[str, list[str]]]:
    parts = urlsplit(raw)
    return unquote(parts.path), parse_qs(parts.query, keep_blank_values=True)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeConsulAgent
    server_version = "FakeConsul/0"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        return

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _send(self, status: int, body: Any, index: int | None = None) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if not isinstance(body, str) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        if index is not None:
            self.send_header("X-Consul-Index", str(index))
            self.send_header("X-Consul-KnownLeader", "true")
            self.send_header("X-Consul-LastContact", "0")
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        fake = self.fake
        path, query = _split_path(self.path)
        token: str | None = self.headers.get("X-Consul-Token") or next(iter(query.get("token", [])), None)
        record = RequestRecord(method, path, query, token)
        with fake._cond:  # logged on arrival (status 0 while held), so tests can see a parked query
            fake.requests.append(record)
            fake._cond.notify_all()
        length = int(self.headers.get("Content-Length") or 0)
        raw_body = self.rfile.read(length) if length else b""
        status, body, index = self._route(method, path, query, token, raw_body)
        with fake._cond:
            record.status = status
            fake._cond.notify_all()
            holds = [release for prefix, release in fake._holds if path.startswith(prefix)]
        for release in holds:
            release.wait(30)
        self._send(status, body, index)

    def _route(self, method: str, path: str, query: dict[str, list[str]], token: str | None,
               raw_body: bytes) -> tuple[int, Any, int | None]:
        fake = self.fake
        with fake._cond:
            failure = next((f for f in fake._failures if path.startswith(f.path_prefix)), None)
            if failure is not None:
                fake._failures.remove(failure)
                return failure.status, failure.body, None
        if fake.acl_token is not None and token != fake.acl_token:
            return 403, "Permission denied", None
        dc = next(iter(query.get("dc", [])), None)
        if dc is not None and dc != fake.datacenter:
            return 500, "No path to datacenter", None
        try:
            if method == "PUT" and path == "/v1/agent/service/register":
                try:
                    body = json.loads(raw_body or b"null")
                except json.JSONDecodeError as e:
                    return 400, f"Request decode failed: {e}", None
                if not isinstance(body, dict):
                    return 400, "Request decode failed: expected an object", None
                status, text = fake._register(body, query)
                return status, text, None
            if method == "PUT" and path.startswith("/v1/agent/service/deregister/"):
                status, text = fake._deregister(path.rsplit("/", 1)[1])
                return status, text, None
            if method == "GET" and path.startswith("/v1/health/service/"):
                return self._health(path.rsplit("/", 1)[1], query)
            if method == "GET" and path == "/v1/catalog/services":
                with fake._cond:
                    index = fake._block(lambda: fake._index, query)
                    services: dict[str, set[str]] = {"consul": set()}
                    for inst in fake._instances.values():
                        services.setdefault(inst.name, set()).update(inst.tags)
                return 200, {k: sorted(v) for k, v in services.items()}, index
            if method == "GET" and path == "/v1/agent/services":
                with fake._cond:
                    listing = {sid: fake._agent_service(inst) for sid, inst in fake._instances.items()
                               if sid in fake.registrations}
                return 200, listing, None
            if method == "GET" and path == "/v1/status/leader":
                return 200, "127.0.0.1:8300", None
        except ValueError as e:  # a malformed index or wait
            return 400, str(e), None
        return 404, f"fake consul: no route for {method} {path}", None

    def _health(self, name: str, query: dict[str, list[str]]) -> tuple[int, Any, int | None]:
        fake = self.fake
        passing = "passing" in query and (query["passing"][0] or "1").lower() not in ("0", "false")
        with fake._cond:
            index = fake._block(lambda: fake._service_index.get(name, fake._index), query)
            entries = []
            for inst in sorted(fake._instances.values(), key=lambda i: i.id):
                if inst.name != name:
                    continue
                if passing and inst.check_status not in (None, "passing"):
                    continue
                entries.append(fake._health_entry(inst))
        return 200, entries, index

