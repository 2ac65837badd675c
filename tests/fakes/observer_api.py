"""FakeObserverApi: a FAKE of the observer's HTTP API, for page-level tests of the dashboard only.

It serves the real dashboard files (aivo_mesh.telemetry.dashboard) and canned JSON documents shaped as
the observer's API documents them (docs/telemetry.md): /api/v1/mesh, /api/v1/history, /api/v1/traces,
and records every POST /api/v1/breakers/reset. The test edits `mesh`, `traces` and `history` between
refreshes. End-to-end tests use the real observer of a real `meshctl up` instead (tests/test_dashboard.py).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aivo_mesh.telemetry.dashboard import dashboard_asset


def golden(rps: float, success_rate: float | None, p50: float | None = 2.0) -> dict[str, Any]:
    requests = round(rps * 60)
    return {"requests": requests, "rps": rps, "success_rate": success_rate if requests else None,
            "p50_ms": p50 if requests else None, "p95_ms": p50 * 3 if requests and p50 else None,
            "p99_ms": p50 * 5 if requests and p50 else None}


def canned_mesh() -> dict[str, Any]:
    """Four proxyless services, learner-svc calling auth-svc and analytics-svc calling event-collector-svc,
    mesh-client calling every one; a control plane with one NACK."""
    names = ["auth-svc", "learner-svc", "event-collector-svc", "analytics-svc"]
    calls = {"learner-svc": "auth-svc", "analytics-svc": "event-collector-svc"}

    def service(name: str) -> dict[str, Any]:
        upstreams = [{"service": calls[name], "state": "healthy", "breaker": "closed",
                      "hosts": {"total": 1, "healthy": 1, "ejected": 0}, "retry_budget": {"used": 0, "limit": 3}}
                     ] if name in calls else []
        return {"name": name, "plane": "proxyless", "health": "healthy", "process": {"pid": 1, "restarts": 0},
                "server": golden(5.0, 1.0), "client": golden(5.0 if name in calls else 0.0, 1.0),
                "upstreams": upstreams, "rate_limited": {"window_count": 0}}

    edges = [{"from": "mesh-client", "to": n, "caller_identity": "spiffe://aivo.local/mesh-client",
              "golden": golden(5.0, 1.0)} for n in names]
    edges += [{"from": a, "to": b, "caller_identity": f"spiffe://aivo.local/{a}", "golden": golden(5.0, 1.0)}
              for a, b in calls.items()]
    return {
        "schema": "aivo-mesh/mesh/v1", "generated_at": 1_700_000_000, "window_seconds": 60,
        "interval_seconds": 1, "plane": "proxyless", "source": "a FAKE observer (tests/fakes/observer_api.py)",
        "services": [service(n) for n in names],
        "routes": [{"service": "auth-svc", "route": "/aivo.auth.v1.AuthService/ValidateToken", "side": "server",
                    "golden": golden(5.0, 1.0)}],
        "edges": edges,
        "control_plane": {"address": "127.0.0.1:18000", "nodes": [
            {"node": "spiffe://aivo.local/auth-svc", "group": "auth-svc", "acked_version": "3", "last_nack": None},
            {"node": "spiffe://aivo.local/learner-svc", "group": "learner-svc", "acked_version": "2",
             "last_nack": {"version": "3", "message": "route timeout: expected a duration", "at": 1_700_000_000}}]},
    }


def failed_trace(trace_id: str) -> dict[str, Any]:
    """One failed trace as `meshctl traces --errors -o json` gives it: learner-svc's call to auth-svc."""
    start = 1_700_000_000_000_000_000
    spans = [
        {"trace_id": trace_id, "span_id": "01", "parent_span_id": "", "name": "GetProfile", "kind": "SERVER",
         "service": "learner-svc", "start_ns": start, "end_ns": start + 9_000_000, "status": "ERROR",
         "status_message": "auth-svc: UNAVAILABLE", "attributes": {}, "events": [], "scope": "", "failed": True},
        {"trace_id": trace_id, "span_id": "02", "parent_span_id": "01", "name": "ValidateToken", "kind": "CLIENT",
         "service": "learner-svc", "start_ns": start + 1_000_000, "end_ns": start + 8_000_000, "status": "ERROR",
         "status_message": "UNAVAILABLE", "attributes": {}, "events": [], "scope": "", "failed": True},
    ]
    return {"trace_id": trace_id, "start_ns": start, "duration_ns": 9_000_000, "services": ["learner-svc"],
            "errors": 2, "spans": spans}


class FakeObserverApi:
    """In a background thread on 127.0.0.1 (an OS-chosen port); `url` is the dashboard's address."""

    def __init__(self) -> None:
        self.mesh: dict[str, Any] = canned_mesh()
        self.traces: list[dict[str, Any]] = [failed_trace("ab" * 16)]
        # What every history point holds; its times are the last 5 minutes, whenever it is asked.
        self.history_point: dict[str, Any] = {"rps": 5.0, "success_rate": 1.0, "p50_ms": 2.0, "p95_ms": 6.0,
                                              "p99_ms": 10.0}
        self.resets: list[dict[str, Any]] = []
        self.down = False  # True: every API request answers 503, as an observer that stopped sampling
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str]) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, obj: Any) -> None:
                self._send(status, json.dumps(obj).encode(), "application/json", {})

            def do_GET(self) -> None:
                split = urlsplit(self.path)
                asset = dashboard_asset("GET", split.path)
                if asset is not None:
                    self._send(asset.status, asset.body, asset.content_type, asset.headers)
                elif fake.down:
                    self._json(503, {"error": "observer stopped"})
                elif split.path == "/api/v1/mesh":
                    self._json(200, fake.mesh)
                elif split.path == "/api/v1/history":
                    now = time.time()
                    points = [{"t": now - 10 * i, **fake.history_point} for i in range(30, -1, -1)]
                    self._json(200, {"schema": "aivo-mesh/history/v1", "points": points})
                elif split.path == "/api/v1/traces":
                    query = parse_qs(split.query)
                    wanted, limit = query.get("trace_id", [""])[-1], int(query.get("limit", ["20"])[-1])
                    found = [t for t in fake.traces if t["trace_id"].startswith(wanted)]
                    self._json(200, {"traces": found[:limit]})
                else:
                    self._json(404, {"error": "no such endpoint"})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if urlsplit(self.path).path != "/api/v1/breakers/reset":
                    self._json(404, {"error": "no such endpoint"})
                    return
                request = json.loads(body)
                fake.resets.append(request)
                self._json(200, {"service": request["upstream"], "reset": True,
                                 "circuit_breaker": {"state": "closed"}})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def __enter__(self) -> FakeObserverApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
