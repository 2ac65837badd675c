"""Grafana renderer: a structurally valid dashboard over exported metrics, and its provisioning.

Series checks use captured scrapes (tests/fixtures/): `meshctl up`-style local meshes with mesh.yaml plus
a rate limit on auth-svc (30/s) and its ValidateToken route (20/s per caller), 8 s of demo traffic and
three calls to a method no allow rule admits. metrics_{auth,learner}_proxyless.txt: the apps' admin
/metrics on the proxyless plane; envoy_prometheus_{auth,learner}.txt: the sidecars' /stats/prometheus
(Envoy 1.40) on the sidecar plane, trimmed to the cluster, HTTP and RBAC families of auth-svc's peer
cluster (learner's sidecar) and of local_app (auth's sidecar).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from binaries import needs, require
from test_prometheus import exported_metric_names, promql_metric_names

from aivo_mesh.config.loader import load_mesh
from aivo_mesh.render import grafana, render_target

ROOT = Path(__file__).resolve().parents[1]
MESH = load_mesh(ROOT / "mesh.yaml")
DASHBOARD = "dashboards/mesh-dashboard.json"
FIXTURES = Path(__file__).parent / "fixtures"
SCRAPES = ("metrics_auth_proxyless.txt", "metrics_learner_proxyless.txt", "envoy_prometheus_auth.txt",
           "envoy_prometheus_learner.txt")
# Labels Prometheus adds to every scraped series (render/prometheus.py's jobs and target labels).
TARGET_LABELS = {"job", "instance", "mesh_service"}


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(render_target("grafana", MESH)[DASHBOARD])
    return doc


def test_dashboard_top_level_fields():
    d = dashboard()
    assert d["uid"] == "aivo-mesh"
    assert isinstance(d["schemaVersion"], int)
    assert d["schemaVersion"] >= 36
    assert d["title"]
    assert d["time"] == {"from": "now-1h", "to": "now"}
    assert isinstance(d["panels"], list)
    assert d["panels"]
    (var,) = d["templating"]["list"]
    assert var["name"] == "service"
    assert var["type"] == "query"
    assert "label_values(" in var["definition"]
    assert var["includeAll"]


def query_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def test_every_panel_has_position_datasource_and_promql_targets():
    d = dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    assert ids == sorted(ids)
    titles = [p["title"] for p in d["panels"]]
    assert len(titles) == len(set(titles)), titles
    for p in d["panels"]:
        grid = p["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"}
        assert grid["x"] >= 0
        assert grid["x"] + grid["w"] <= 24
        if p["type"] == "row":  # a section header: full width, holds no query
            assert (grid["x"], grid["w"], grid["h"]) == (0, 24, 1)
            assert "targets" not in p
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": grafana.DATASOURCE_UID}
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["expr"].strip()
            assert t["datasource"]["uid"] == grafana.DATASOURCE_UID
            assert '$service' in t["expr"], (p["title"], t["expr"])  # the template variable filters it
    # panels do not overlap
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))


def test_the_panels_of_the_brief_use_exported_metrics():
    exported = exported_metric_names()
    titles = {p["title"]: p for p in query_panels()}
    assert {"Server request rate by service", "Server success rate by service", "Server p50 latency by method",
            "Server p99 latency by method", "Client success rate by method", "Circuit breaker state",
            "Retries and exhausted budgets", "Certificate expiry", "Upstream requests by response class",
            "Upstream p99 (upstream_rq_time)", "Sidecar retries and retry overflow", "Outlier ejections",
            "Circuit-breaker overflow", "Inbound RBAC denials", "Rate-limited calls by caller",
            "Rate-limited calls at the sidecar"} <= set(titles)
    used = set()
    for p in titles.values():
        for t in p["targets"]:
            names = promql_metric_names(t["expr"])
            assert names, t["expr"]
            used |= names
    app = {n for n in used if not n.startswith("envoy_")}
    assert app <= exported, app - exported
    assert {"grpc_requests_total", "grpc_request_duration_seconds_bucket", "circuit_breaker_state",
            "grpc_retries_total", "mtls_certificate_expiry_seconds", "grpc_rate_limited_total"} <= used
    p99 = titles["Server p99 latency by method"]["targets"][0]["expr"]
    assert p99.startswith("histogram_quantile(0.99, sum by (le, service, method)")
    mapping = titles["Circuit breaker state"]["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert {k: v["text"] for k, v in mapping.items()} == {"0": "closed", "1": "half_open", "2": "open"}


def test_provisioning_points_at_the_dashboard_and_prometheus():
    files = render_target("grafana", MESH)
    providers = yaml.safe_load(files["provisioning/dashboards/mesh.yaml"])
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == grafana.DASHBOARDS_DIR
    sources = yaml.safe_load(files["provisioning/datasources/prometheus.yaml"])
    (ds,) = sources["datasources"]
    assert (ds["type"], ds["uid"], ds["url"]) == ("prometheus", grafana.DATASOURCE_UID, "http://prometheus:9090")
    # the compose file mounts exactly these directories
    compose = yaml.safe_load(render_target("compose", MESH)["docker-compose.yaml"])
    assert f"./grafana/dashboards:{grafana.DASHBOARDS_DIR}:ro" in compose["services"]["grafana"]["volumes"]


def test_rendering_is_deterministic():
    assert render_target("grafana", MESH) == render_target("grafana", load_mesh(ROOT / "mesh.yaml"))


@needs("promtool")
def test_every_panel_query_parses_as_promql(tmp_path):
    """promtool has no query checker, so each panel query becomes a recording rule for `check rules`
    (Grafana's variables replaced by what they expand to)."""
    exprs = [t["expr"].replace("$__rate_interval", "5m").replace("$service", ".*")
             for p in query_panels() for t in p["targets"]]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:panel_{i}", "expr": e}
                                                         for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run([require("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(exprs)} rules found" in out.stdout


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(name: str) -> list[tuple[str, dict[str, str], float]]:
    """A captured text exposition's samples as Prometheus stores them: the name as written (a parsing
    library would add `_total` to Envoy's counters, which Prometheus does not), labels, value."""
    out = []
    for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines():
        if (m := _SAMPLE.match(line)) is not None:
            out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


def scraped_series() -> dict[str, set[str]]:
    """Sample name -> label names, over every captured scrape (module docstring)."""
    found: dict[str, set[str]] = {}
    for name in SCRAPES:
        for sample, labels, _ in scrape(name):
            found.setdefault(sample, set()).update(labels)
    return found


_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(?:=~|!~|!=|=)\s*"')
_GROUPING = re.compile(r"\bby \(([^)]*)\)")


def test_every_panel_queries_series_a_running_mesh_exports():
    """Each metric a panel names is in a real scrape, with every label the panel matches or groups on
    (or one Prometheus adds): no panel queries a series nobody exports or a label it does not carry."""
    series = scraped_series()
    for p in query_panels():
        for t in p["targets"]:
            expr = t["expr"]
            names = promql_metric_names(expr)
            assert names <= set(series), (p["title"], names - set(series))
            carried = set().union(*(series[n] for n in names)) | TARGET_LABELS
            for metric, matchers in _SELECTOR.findall(expr):
                wanted = set(_MATCHER.findall(matchers))
                assert wanted <= series[metric] | TARGET_LABELS, (p["title"], metric, wanted - series[metric])
            for grouping in _GROUPING.findall(expr):
                wanted = {label.strip() for label in grouping.split(",")}
                assert wanted <= carried, (p["title"], wanted - carried)


def test_the_sidecar_rate_limit_counts_every_scope_as_one_series_name():
    """A route's own buckets are tagged like the service's, so one query sums them (render/envoy.py
    route_rate_limit_stats); the capture had both scopes refusing calls."""
    refused = {labels["envoy_local_http_ratelimit_prefix"]: value
               for sample, labels, value in scrape("envoy_prometheus_auth.txt")
               if sample == "envoy_http_local_rate_limit_rate_limited"}
    assert set(refused) == {"inbound_rate_limit", "inbound_rate_limit_ValidateToken"}
    assert all(v > 0 for v in refused.values())
    assert "envoy_inbound_rate_limit_ValidateToken_http_local_rate_limit_rate_limited" not in scraped_series()


def test_golden_panels_count_as_meshctl_status_does():
    """Same success (status OK, golden_terms.SUCCESS), same series, health probes left out: the
    dashboard's golden figures are telemetry/golden.py's."""
    golden = [p for p in query_panels() if p["title"].startswith(("Server ", "Client "))]
    # two sides x (per service: success, rps, p50/p95/p99 in one; per route: success, rps, p50, p95, p99)
    assert len(golden) == 2 * (3 + 5)
    health = '!~"/grpc\\\\.health\\\\.v1\\\\.Health/.+"'
    for p in golden:
        side = "server" if p["title"].startswith("Server") else "client"
        for t in p["targets"]:
            selectors = _SELECTOR.findall(t["expr"])
            assert selectors, t["expr"]
            for metric, matchers in selectors:
                assert metric in {"grpc_requests_total", "grpc_request_duration_seconds_bucket"}
                assert f'side="{side}"' in matchers
                assert f"method{health}" in matchers, matchers
        if "success rate" in p["title"]:
            numerator, denominator = p["targets"][0]["expr"].split("\n  / ")
            assert numerator.replace(',status="OK"', "") == denominator
