"""The web dashboard: static files (HTML, JS, CSS) the observer's HTTP server serves at `/`.

The page is plain HTML, CSS and JavaScript shipped as package data (aivo_mesh/telemetry/dashboard_static/),
with no build step and no third-party code: it draws the topology, the plots and the trace waterfalls as
SVG from the observer's JSON API (/api/v1/mesh, /api/v1/history, /api/v1/traces) and resets a breaker with
POST /api/v1/breakers/reset. docs/telemetry.md, section "Dashboard".

What is served is fixed: a path is looked up in ASSETS, never joined to a directory, so no request reaches
another file. Every answer carries a Content-Security-Policy that lets the page load only its own script,
style and JSON (no inline script, no other origin, no framing).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from aivo_mesh.telemetry.admin import HttpError, Request, Response

__all__ = ["ASSETS", "CONTENT_SECURITY_POLICY", "SECURITY_HEADERS", "dashboard_asset", "dashboard_url",
           "same_origin_json"]

# Request path -> (file in dashboard_static/, Content-Type).
ASSETS: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}

# 'self' only: the page's own script and stylesheet, fetches to the same observer; nothing inline (the
# script builds SVG through the DOM and sets no style attributes), no plugins, no framing, no forms.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


@cache
def _read(name: str) -> bytes:
    return resources.files("aivo_mesh.telemetry").joinpath("dashboard_static", name).read_bytes()


def dashboard_asset(method: str, path: str) -> Response | None:
    """The dashboard's answer to `method path`, or None when the path is not one of its files (the caller
    answers that: the API, or a 404). GET only."""
    found = ASSETS.get(path)
    if found is None:
        return None
    name, content_type = found
    if method != "GET":
        return Response(405, b'{"error": "Method not allowed, GET required"}\n', "application/json",
                        {"Allow": "GET", **SECURITY_HEADERS})
    return Response(200, _read(name), content_type, dict(SECURITY_HEADERS))


def dashboard_url(observer: str) -> str:
    """The dashboard's address, from the observer's HOST:PORT (runtime.json's `observer`)."""
    return f"http://{observer}/"


def _own_hosts(host: str, port: int) -> set[str]:
    names = {host, "127.0.0.1", "localhost", "[::1]"} if host in ("127.0.0.1", "localhost", "::1") else {host}
    return {f"{name}:{port}" for name in names}


def same_origin_json(request: Request, host: str, port: int) -> None:
    """Refuse (HttpError) a state-changing request that a web page of another site could make a browser
    send to this loopback server: its Host must name this server (a DNS-rebinding page names its own),
    an Origin, when the browser sends one, must be this server's, and the body must be declared
    application/json, which no HTML form can send and no cross-origin script can without a CORS
    preflight this server never grants."""
    own = _own_hosts(host, port)
    if request.headers.get("host", "").lower() not in own:
        raise HttpError(421, "Host names another server: this one answers only to its loopback address")
    origin = request.headers.get("origin")
    if origin is not None and origin.lower() not in {f"http://{h}" for h in own}:
        raise HttpError(403, "cross-origin request refused")
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise HttpError(415, "expected Content-Type: application/json")
