"""mesh.yaml -> a Grafana dashboard of the mesh and the provisioning that loads it.

    dashboards/mesh-dashboard.json           the dashboard (uid `aivo-mesh`)
    provisioning/dashboards/mesh.yaml        file provider reading /etc/grafana/dashboards
    provisioning/datasources/prometheus.yaml the Prometheus datasource (uid `prometheus`, http://prometheus:9090)

Panels (PromQL over aivo_mesh.telemetry.metrics names; `$service` filters every panel): request
rate, error ratio, p50 and p99 per service and method, circuit breaker state over time, retries and
exhausted retry budgets, local rejections, and days left on each mTLS certificate. Panel ids and
positions are assigned in order, so the JSON is deterministic.
"""

from __future__ import annotations

from typing import Any

from aivo_mesh.config.model import MeshSpec
from aivo_mesh.render import Document

DATASOURCE_UID = "prometheus"
DASHBOARD_UID = "aivo-mesh"
DASHBOARDS_DIR = "/etc/grafana/dashboards"
PROMETHEUS_URL = "http://prometheus:9090"
SCHEMA_VERSION = 39
SEL = 'service=~"$service"'
RATE = "$__rate_interval"


def _ds() -> dict[str, str]:
    return {"type": "prometheus", "uid": DATASOURCE_UID}


def _target(ref: str, expr: str, legend: str) -> dict[str, Any]:
    return {"refId": ref, "datasource": _ds(), "expr": expr, "legendFormat": legend, "range": True}


def _panel(title: str, description: str, targets: list[tuple[str, str]], *, unit: str, kind: str = "timeseries",
           extra_defaults: dict[str, Any] | None = None) -> dict[str, Any]:
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
    }


def panels() -> list[dict[str, Any]]:
    server = f'side="server",{SEL}'

    def quantile(q: str) -> str:
        return (f"histogram_quantile({q}, sum by (le, service, method) "
                f"(rate(grpc_request_duration_seconds_bucket{{{server}}}[{RATE}])))")

    breaker_states = {"type": "value", "options": {
        "0": {"text": "closed", "color": "green", "index": 0},
        "1": {"text": "half_open", "color": "yellow", "index": 1},
        "2": {"text": "open", "color": "red", "index": 2}}}
    specs = [
        _panel("Request rate", "Calls served per second, by service (server side).",
               [(f"sum by (service) (rate(grpc_requests_total{{{server}}}[{RATE}]))", "{{service}}")],
               unit="reqps"),
        _panel("Error ratio", "Share of served calls ending with a status other than OK (alert at 5 %).",
               [(f'sum by (service) (rate(grpc_requests_total{{{server},status!="OK"}}[{RATE}]))\n'
                 f"  / sum by (service) (rate(grpc_requests_total{{{server}}}[{RATE}]))", "{{service}}")],
               unit="percentunit", extra_defaults={"min": 0, "max": 1}),
        _panel("p50 latency by method", "Median server-side duration per service and method.",
               [(quantile("0.5"), "{{service}} {{method}}")], unit="s"),
        _panel("p99 latency by method", "99th percentile server-side duration per service and method "
               "(alert at 80 % of the route's timeout).",
               [(quantile("0.99"), "{{service}} {{method}}")], unit="s"),
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
    ]
    out = []
    for i, p in enumerate(specs):
        p = {"id": i + 1, "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8}, **p}
        out.append(p)
    return out


def dashboard(mesh: MeshSpec) -> dict[str, Any]:
    return {
        "uid": DASHBOARD_UID,
        "title": f"{mesh.mesh.name} mesh",
        "description": "aivo-mesh: traffic, errors, latency, breakers, retries and certificates (rendered from "
                       "mesh.yaml by meshctl render grafana)",
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
