"""Grafana renderer: a structurally valid dashboard over exported metrics, and its provisioning."""

from __future__ import annotations

import json
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


def test_every_panel_has_position_datasource_and_promql_targets():
    d = dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    assert ids == sorted(ids)
    for p in d["panels"]:
        grid = p["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"}
        assert grid["x"] >= 0
        assert grid["x"] + grid["w"] <= 24
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
    titles = {p["title"]: p for p in dashboard()["panels"]}
    assert {"Request rate", "Error ratio", "p50 latency by method", "p99 latency by method", "Circuit breaker state",
            "Retries and exhausted budgets", "Certificate expiry"} <= set(titles)
    used = set()
    for p in titles.values():
        for t in p["targets"]:
            names = promql_metric_names(t["expr"])
            assert names, t["expr"]
            used |= names
    assert used <= exported, used - exported
    assert {"grpc_requests_total", "grpc_request_duration_seconds_bucket", "circuit_breaker_state",
            "grpc_retries_total", "mtls_certificate_expiry_seconds"} <= used
    p99 = titles["p99 latency by method"]["targets"][0]["expr"]
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
             for p in dashboard()["panels"] for t in p["targets"]]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:panel_{i}", "expr": e}
                                                         for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run([require("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(exprs)} rules found" in out.stdout
