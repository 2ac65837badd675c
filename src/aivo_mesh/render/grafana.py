"""mesh.yaml -> a Grafana dashboard of the mesh and the provisioning that loads it.

    dashboards/mesh-dashboard.json           the dashboard (uid `aivo-mesh`)
    provisioning/dashboards/mesh.yaml        file provider reading /etc/grafana/dashboards
    provisioning/datasources/prometheus.yaml the Prometheus datasource (uid `prometheus`, http://prometheus:9090)

Rows of panels (`$service` filters every panel; docs/telemetry.md lists them):

    golden, server side   success rate, rps, p50/p95/p99 per service and per route (gRPC method)
    golden, client side   the same per calling service (calls it made) and per route (its callers' calls)
    client policies       breaker state, retries and exhausted budgets, local rejections, certificates
    Envoy sidecars        per peer cluster: requests by response class, upstream_rq_time p99, retries
                          and retry overflow, outlier ejections, circuit-breaker overflow; RBAC denials
    rate limits           refusals per service and caller (MeshServer) and per scope (the sidecar)

Golden panels mean what `meshctl status` means (telemetry/golden.py): the same series
(grpc_requests_total and grpc_request_duration_seconds of telemetry/metrics.py), a success is status OK
and anything else a failure, and health probes are left out; both take these from golden_terms.py.
Envoy panels read the sidecars' /stats/prometheus as Prometheus scrapes it (render/prometheus.py: the
`envoy` job, each target labelled `mesh_service`); their names are Envoy 1.40's, checked against a
captured scrape in tests/test_grafana.py.

Panel ids and positions are assigned in order, so the JSON is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aivo_mesh.config.model import MeshSpec
from aivo_mesh.golden_terms import HEALTH_PREFIX, SUCCESS
from aivo_mesh.render import Document
from aivo_mesh.render.envoy import INBOUND_LISTENER
from aivo_mesh.render.prometheus import promql_regex

DATASOURCE_UID = "prometheus"
DASHBOARD_UID = "aivo-mesh"
DASHBOARDS_DIR = "/etc/grafana/dashboards"
PROMETHEUS_URL = "http://prometheus:9090"
SCHEMA_VERSION = 39
SEL = 'service=~"$service"'
RATE = "$__rate_interval"
ROW_HEIGHT = 1
PANEL_HEIGHT = 8
WIDTH = 24
QUANTILES = (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99"))
# The app's calls as golden metrics count them: health probes left out (golden_terms.HEALTH_PREFIX).
NOT_HEALTH = f'method!~"{promql_regex([HEALTH_PREFIX])}"'
# The service of the scraped process (a sidecar, or a calling app): Prometheus' target label
# (render/prometheus.py), never `service`, which on a client-side series names the callee.
SCRAPED = 'mesh_service=~"$service"'
# A sidecar's peer clusters: `<service>` or `<service>.<version>` (render/envoy.version_cluster). Envoy's
# own clusters (local_app, xds_control_plane, otlp_collector, ...) have '_', which no service name has.
PEER = 'envoy_cluster_name=~"($service)([.].+)?",envoy_cluster_name!~".*_.*"'


def _ds() -> dict[str, str]:
    return {"type": "prometheus", "uid": DATASOURCE_UID}


def _target(ref: str, expr: str, legend: str) -> dict[str, Any]:
    return {"refId": ref, "datasource": _ds(), "expr": expr, "legendFormat": legend, "range": True}


def _panel(title: str, description: str, targets: list[tuple[str, str]], *, unit: str, kind: str = "timeseries",
           extra_defaults: dict[str, Any] | None = None, width: int = 12) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit}
    defaults.update(extra_defaults or {})
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": _ds(),
        "targets": [_target(chr(ord("A") + i), expr, legend) for i, (expr, legend) in enumerate(targets)],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}} if kind == "timeseries" else {},
        "gridPos": {"h": PANEL_HEIGHT, "w": width, "x": 0, "y": 0},  # placed by `_layout`
    }


@dataclass(frozen=True)
class Row:
    title: str
    panels: list[dict[str, Any]]


# -- golden metrics ----------------------------------------------------------------------------------

def _golden(side: str, match: str, *, by: str, who: str, legend: str) -> list[dict[str, Any]]:
    """Success rate, rps and p50/p95/p99 of the `side` calls selected by `match`, summed by `by`: the
    figures telemetry/golden.py computes for `meshctl status`, over the same series with the same
    success (status OK) and without health probes."""
    calls = f'side="{side}",{match},{NOT_HEALTH}'
    total = f"sum by ({by}) (rate(grpc_requests_total{{{calls}}}[{RATE}]))"
    ok = f'sum by ({by}) (rate(grpc_requests_total{{{calls},status="{SUCCESS}"}}[{RATE}]))'

    def quantile(q: str) -> str:
        return (f"histogram_quantile({q}, sum by (le, {by}) "
                f"(rate(grpc_request_duration_seconds_bucket{{{calls}}}[{RATE}])))")

    per_route = "method" in by
    scope = "by method" if per_route else "by service"
    side_title = side.capitalize()
    panels = [
        _panel(f"{side_title} success rate {scope}",
               f"Share of {who} that ended OK (any other status is a failure; health probes left out).",
               [(f"{ok}\n  / {total}", legend)], unit="percentunit",
               extra_defaults={"min": 0, "max": 1}, width=8),
        _panel(f"{side_title} request rate {scope}", f"{who[0].upper()}{who[1:]} per second (health probes left out).",
               [(total, legend)], unit="reqps", width=8),
    ]
    if per_route:
        panels += [_panel(f"{side_title} {name} latency by method",
                          f"{name} duration of {who}, per method (histogram_quantile over the buckets; "
                          "beyond the largest bucket it reads as that bucket's bound).",
                          [(quantile(q), legend)], unit="s", width=8) for name, q in QUANTILES]
    else:
        panels.append(_panel(f"{side_title} latency p50 / p95 / p99 by service", f"Duration of {who}.",
                             [(quantile(q), f"{name} {legend}") for name, q in QUANTILES], unit="s", width=8))
    return panels


def golden_rows() -> list[Row]:
    server = ("server", SEL)
    return [
        Row("Golden metrics, server side: the calls each service answered", [
            *_golden(*server, by="service", who="calls each service answered", legend="{{service}}"),
            *_golden(*server, by="service, method", who="calls each service answered",
                     legend="{{service}} {{method}}"),
        ]),
        Row("Golden metrics, client side: calls made (by caller) and each route's callers", [
            # The calling service is the scrape target; `service` on a client-side series is the callee.
            *_golden("client", SCRAPED, by="mesh_service", who="calls each service made",
                     legend="{{mesh_service}}"),
            *_golden("client", SEL, by="service, method", who="its callers' calls to each method",
                     legend="{{service}} {{method}}"),
        ]),
    ]
def policy_row() -> Row:
    """The proxyless plane's client policies (MeshClient's own series) and certificates."""
    breaker_states = {"type": "value", "options": {
        "0": {"text": "closed", "color": "green", "index": 0},
        "1": {"text": "half_open", "color": "yellow", "index": 1},
        "2": {"text": "open", "color": "red", "index": 2}}}
    return Row("Client policies and certificates", [
        _panel("Circuit breaker state", "Each caller's breaker per target: closed, half_open, open.",
               [(f"max by (instance, service) (circuit_breaker_state{{{SEL}}})", "{{instance}} -> {{service}}")],
               unit="none", kind="state-timeline", extra_defaults={"mappings": [breaker_states]}),
        _panel("Retries and exhausted budgets", "Retry attempts sent per target and method, and retries "
               "skipped because the retry budget was spent.",
               [(f"sum by (service, method) (rate(grpc_retries_total{{{SEL}}}[{RATE}]))",
                 "retries {{service}} {{method}}"),
                (f"sum by (service) (rate(retry_budget_exhausted_total{{{SEL}}}[{RATE}]))",
                 "budget exhausted {{service}}")],
               unit="ops"),
        _panel("Local rejections", "Calls refused before reaching the network, by reason "
               "(circuit_open, max_requests, retry_budget, ...).",
               [(f"sum by (service, reason) (rate(grpc_local_rejections_total{{{SEL}}}[{RATE}]))",
                 "{{service}} {{reason}}")],
               unit="ops"),
        _panel("Certificate expiry", "Days left on each service's mTLS certificate (alert under 7 days).",
               [(f"min by (service) (mtls_certificate_expiry_seconds{{{SEL}}}) / 86400", "{{service}}")],
               unit="d", kind="bargauge",
               extra_defaults={"thresholds": {"mode": "absolute", "steps": [
                   {"color": "red", "value": None}, {"color": "orange", "value": 7},
                   {"color": "green", "value": 14}]}}),
    ])


def envoy_row() -> Row:
    """The sidecars' own view: per peer cluster (`$service` picks the callee, legends read caller -> peer)
    and the inbound listener's RBAC."""
    pair = "mesh_service, envoy_cluster_name"
    legend = "{{mesh_service}} -> {{envoy_cluster_name}}"

    def per_peer(stat: str) -> str:
        return f"sum by ({pair}) (rate({stat}{{{PEER}}}[{RATE}]))"

    return Row("Envoy sidecars: upstream per peer cluster, inbound RBAC", [
        _panel("Upstream requests by response class", "Requests each sidecar sent to a peer per second, by "
               "HTTP response class. gRPC errors travel in trailers of a 200, so this tells transport "
               "outcomes (5xx: reset, refused, no healthy host); the golden panels tell gRPC statuses.",
               [(f"sum by ({pair}, envoy_response_code_class) "
                 f"(rate(envoy_cluster_upstream_rq_xx{{{PEER}}}[{RATE}]))",
                 legend + " {{envoy_response_code_class}}xx")], unit="reqps"),
        _panel("Upstream p99 (upstream_rq_time)", "99th percentile of each try's time to a peer, as the "
               "caller's sidecar measures it (milliseconds: Envoy's unit).",
               [(f"histogram_quantile(0.99, sum by (le, {pair}) "
                 f"(rate(envoy_cluster_upstream_rq_time_bucket{{{PEER}}}[{RATE}])))", legend)], unit="ms"),
        _panel("Sidecar retries and retry overflow", "Retries the caller's sidecar sent to a peer, and retries "
               "not sent because the retry budget (or max_retries) was spent (upstream_rq_retry_overflow).",
               [(per_peer("envoy_cluster_upstream_rq_retry"), "retries " + legend),
                (per_peer("envoy_cluster_upstream_rq_retry_overflow"), "overflow " + legend)], unit="ops"),
        _panel("Outlier ejections", "Peer hosts ejected now (outlier_detection_ejections_active) and "
               "ejections enforced per second: the sidecar plane's breaker.",
               [(f"max by ({pair}) (envoy_cluster_outlier_detection_ejections_active{{{PEER}}})",
                 "ejected " + legend),
                (per_peer("envoy_cluster_outlier_detection_ejections_enforced_total"), "enforced " + legend)],
               unit="short"),
        _panel("Circuit-breaker overflow", "Requests a sidecar failed at once because a peer's limits were "
               "full: max_pending_requests / max_requests (upstream_rq_pending_overflow) and "
               "max_connections (upstream_cx_overflow).",
               [(per_peer("envoy_cluster_upstream_rq_pending_overflow"), "requests " + legend),
                (per_peer("envoy_cluster_upstream_cx_overflow"), "connections " + legend)], unit="ops"),
        _panel("Inbound RBAC denials", "Calls a service's sidecar refused with PERMISSION_DENIED because the "
               "caller is not on the allow-list, and connections refused for a certificate that is not one "
               "SPIFFE ID.",
               [(f"sum by (mesh_service) (rate(envoy_http_rbac_denied"
                 f'{{{SCRAPED},envoy_http_conn_manager_prefix="{INBOUND_LISTENER}"}}[{RATE}]))',
                 "calls {{mesh_service}}"),
                (f"sum by (mesh_service) (rate(envoy_rbac_denied{{{SCRAPED}}}[{RATE}]))",
                 "connections {{mesh_service}}")], unit="ops"),
    ])


def rate_limit_row() -> Row:
    """mesh.yaml `rate_limit` refusals, as each plane counts them."""
    return Row("Rate limits: refused calls", [
        _panel("Rate-limited calls by caller", "Calls each service (MeshServer) refused with RESOURCE_EXHAUSTED "
               "because the caller's bucket was empty, per caller's SPIFFE ID.",
               [(f"sum by (service, caller) (rate(grpc_rate_limited_total{{{SEL}}}[{RATE}]))",
                 "{{service}} <- {{caller}}")], unit="ops", width=8),
        _panel("Rate-limited calls by method", "The same refusals per method.",
               [(f"sum by (service, method) (rate(grpc_rate_limited_total{{{SEL}}}[{RATE}]))",
                 "{{service}} {{method}}")], unit="ops", width=8),
        _panel("Rate-limited calls at the sidecar", "Calls a service's sidecar refused (its local rate limit), "
               "per bucket scope: inbound_rate_limit for the service's block, inbound_rate_limit_<Method> for "
               "a route's own. Envoy counts no caller.",
               [(f"sum by (mesh_service, envoy_local_http_ratelimit_prefix) "
                 f"(rate(envoy_http_local_rate_limit_rate_limited{{{SCRAPED}}}[{RATE}]))",
                 "{{mesh_service}} {{envoy_local_http_ratelimit_prefix}}")], unit="ops", width=8),
    ])


def rows() -> list[Row]:
    return [*golden_rows(), policy_row(), envoy_row(), rate_limit_row()]


def _layout(sections: list[Row]) -> list[dict[str, Any]]:
    """Grafana rows and their panels, left to right and wrapped at the dashboard's width; ids in order."""
    out: list[dict[str, Any]] = []
    y = 0
    for row in sections:
        out.append({"id": len(out) + 1, "type": "row", "title": row.title, "collapsed": False, "panels": [],
                    "gridPos": {"h": ROW_HEIGHT, "w": WIDTH, "x": 0, "y": y}})
        y += ROW_HEIGHT
        x = 0
        for p in row.panels:
            w = p["gridPos"]["w"]
            if x + w > WIDTH:
                x, y = 0, y + PANEL_HEIGHT
            out.append({"id": len(out) + 1, **p, "gridPos": {"h": PANEL_HEIGHT, "w": w, "x": x, "y": y}})
            x += w
        y += PANEL_HEIGHT
    return out


def panels() -> list[dict[str, Any]]:
    return _layout(rows())


def dashboard(mesh: MeshSpec) -> dict[str, Any]:
    return {
        "uid": DASHBOARD_UID,
        "title": f"{mesh.mesh.name} mesh",
        "description": "aivo-mesh: golden metrics (server and client side), client policies, certificates, Envoy "
                       "sidecars and rate limits (rendered from mesh.yaml by meshctl render grafana)",
        "tags": ["aivo-mesh", "grpc"],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": False,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "templating": {"list": [{
            "name": "service",
            "label": "service",
            "type": "query",
            "datasource": _ds(),
            "query": {"query": "label_values(grpc_requests_total, service)", "refId": "service"},
            "definition": "label_values(grpc_requests_total, service)",
            "refresh": 2,
            "multi": True,
            "includeAll": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "options": [],
            "sort": 1,
        }]},
        "annotations": {"list": []},
        "panels": panels(),
    }


def render(mesh: MeshSpec) -> dict[str, Document]:
    return {
        "dashboards/mesh-dashboard.json": dashboard(mesh),
        "provisioning/dashboards/mesh.yaml": {
            "apiVersion": 1,
            "providers": [{"name": "aivo-mesh", "folder": "aivo-mesh", "type": "file", "disableDeletion": True,
                           "allowUiUpdates": False, "updateIntervalSeconds": 30,
                           "options": {"path": DASHBOARDS_DIR, "foldersFromFilesStructure": False}}],
        },
        "provisioning/datasources/prometheus.yaml": {
            "apiVersion": 1,
            "datasources": [{"name": "Prometheus", "type": "prometheus", "uid": DATASOURCE_UID, "access": "proxy",
                             "url": PROMETHEUS_URL, "isDefault": True, "editable": False,
                             "jsonData": {"timeInterval": "15s"}}],
        },
    }
