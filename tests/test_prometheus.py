"""Prometheus renderer: config, alerting rules and their unit tests, checked by the real promtool."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from binaries import needs, require

from aivo_mesh.config.loader import load_mesh
from aivo_mesh.config.resolve import route_policy, service_policy
from aivo_mesh.render import prometheus, render_target
from aivo_mesh.telemetry.metrics import MeshMetrics

ROOT = Path(__file__).resolve().parents[1]
MESH = load_mesh(ROOT / "mesh.yaml")
needs_promtool = needs("promtool")

# -- PromQL metric names -----------------------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names used by a PromQL expression: identifiers that are not functions, keywords, label
    names (in `{...}` or `by (...)`), strings, durations or numbers."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w$.])([A-Za-z_:][A-Za-z0-9_:]*)\b(\s*\()?", text):
        if m.group(2) or m.group(1).lower() in _KEYWORDS:
            continue
        names.add(m.group(1))
    return names


def exported_metric_names() -> set[str]:
    """Sample names aivo-mesh exports (counters `_total`, histograms `_bucket/_count/_sum`)."""
    names = set()
    for family in MeshMetrics().registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_count", "_sum")}
        else:
            names.add(family.name)
    return names


def test_metric_name_parser():
    assert promql_metric_names('histogram_quantile(0.99, sum by (le, method) (rate(x_bucket{a="b"}[5m]))) > 0.8') \
        == {"x_bucket"}
    assert promql_metric_names("increase(retry_budget_exhausted_total[5m]) > 0") == {"retry_budget_exhausted_total"}
    assert promql_metric_names("mtls_certificate_expiry_seconds < 7 * 86400") == {"mtls_certificate_expiry_seconds"}
    assert promql_metric_names('sum by (service) (rate(a_total{s!~"x|y"}[$__rate_interval])) / b') == {"a_total", "b"}


# -- the rendered files ------------------------------------------------------------------------------

def files() -> dict[str, Any]:
    return {p: yaml.safe_load(t) for p, t in render_target("prometheus", MESH).items()}


def rules() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = files()[prometheus.RULES_FILE]["groups"][0]["rules"]
    return found


def test_scrapes_every_admin_endpoint_and_every_envoy():
    config = files()["prometheus.yml"]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    aivo, envoy = jobs["aivo-mesh"], jobs["envoy"]
    assert aivo["metrics_path"] == "/metrics"
    assert envoy["metrics_path"] == "/stats/prometheus"
    assert [sc["targets"] for sc in aivo["static_configs"]] == [[f"{s.name}:{s.admin_port}"] for s in MESH.services]
    assert [sc["targets"] for sc in envoy["static_configs"]] == [[f"{s.name}:15090"] for s in MESH.services]
    for sc in aivo["static_configs"] + envoy["static_configs"]:
        assert "service" not in sc["labels"]  # would shadow the metrics' own `service` label
        assert sc["labels"]["mesh_service"] in MESH.service_names
    assert config["rule_files"] == ["rules/*.yml"]


def test_alert_rules_use_only_exported_metrics():
    exported = exported_metric_names()
    used = set()
    for r in rules():
        used |= promql_metric_names(r["expr"])
    assert used
    assert used <= exported, used - exported


def test_every_alert_of_the_brief_is_there():
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in rules():
        by_name.setdefault(r["alert"], []).append(r)
    assert set(by_name) == set(prometheus.ALERTS)
    (breaker,) = by_name["MeshCircuitBreakerOpen"]
    assert (breaker["expr"], breaker["for"]) == ("circuit_breaker_state == 2", "1m")
    (errors,) = by_name["MeshHighErrorRate"]
    assert 'side="server",status!="OK"' in errors["expr"]
    assert errors["expr"].endswith("> 0.05")
    (cert,) = by_name["MeshCertificateExpiringSoon"]
    assert cert["expr"] == f"mtls_certificate_expiry_seconds < {7 * 86400}"
    (budget,) = by_name["MeshRetryBudgetExhausted"]
    assert budget["expr"] == "increase(retry_budget_exhausted_total[5m]) > 0"


def _service_of(expr: str) -> str:
    found = re.search(r'service="([^"]+)"', expr)
    assert found is not None, expr
    return found.group(1)


def test_one_latency_rule_per_route_and_per_service_at_80_percent_of_the_timeout():
    latency = [r for r in rules() if r["alert"] == "MeshLatencyNearTimeout"]
    assert len(latency) == sum(len(s.routes) + 1 for s in MESH.services)
    by_key = {(_service_of(r["expr"]), r["labels"]["route"]): r for r in latency}
    for svc in MESH.services:
        for route in svc.routes:
            rule = by_key[(svc.name, route.match)]
            timeout = route_policy(MESH, svc.name, route.match).timeout
            threshold = min(0.8 * timeout, 10.0)
            assert rule["expr"].rstrip().endswith(f" {prometheus._num(threshold)}")
            assert f'method="{route.match}"' in rule["expr"]
        default = by_key[(svc.name, "default")]
        timeout = service_policy(MESH, svc.name).timeout
        assert default["expr"].rstrip().endswith(f" {prometheus._num(min(0.8 * timeout, 10.0))}")
        if svc.routes:  # the route's own methods are left to the route's rule
            assert "method!~" in default["expr"]
    validate = by_key[("auth-svc", "/aivo.auth.v1.AuthService/ValidateToken")]
    assert validate["expr"].endswith("> 0.8")
    assert validate["labels"]["route_timeout"] == "1s"
    stream = by_key[("event-collector-svc", "/aivo.events.v1.EventCollectorService/CollectStream")]
    assert stream["expr"].endswith(">= 10")  # 80 % of 30s is past the 10 s bucket: clamped, and says so
    assert "largest bucket" in stream["annotations"]["description"]


def test_unit_tests_fire_every_alert_and_keep_a_healthy_mesh_quiet():
    suite = files()[prometheus.TESTS_FILE]
    assert suite["rule_files"] == ["../rules/mesh-alerts.yml"]
    fired = set()
    for case in suite["tests"]:
        for check in case["alert_rule_test"]:
            if check["exp_alerts"]:
                fired.add(check["alertname"])
    assert fired == set(prometheus.ALERTS)
    healthy = next(c for c in suite["tests"] if c["name"].startswith("healthy"))
    assert {c["alertname"] for c in healthy["alert_rule_test"]} == set(prometheus.ALERTS)
    assert all(c["exp_alerts"] == [] for c in healthy["alert_rule_test"])
    names = set()
    for case in suite["tests"]:
        for s in case["input_series"]:
            names.add(s["series"].split("{")[0])
    assert names <= exported_metric_names()


# -- promtool ----------------------------------------------------------------------------------------

def write(tmp_path: Path) -> Path:
    out = tmp_path / "prometheus"
    for rel, text in render_target("prometheus", MESH).items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    return out


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          check=False)


@needs_promtool
def test_promtool_accepts_config_rules_and_passes_the_unit_tests(tmp_path):
    out = write(tmp_path)
    check = promtool("check", "config", "prometheus.yml", cwd=out)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "1 rule files found" in check.stdout
    check = promtool("check", "rules", prometheus.RULES_FILE, cwd=out)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{len(rules())} rules found" in check.stdout
    test = promtool("test", "rules", prometheus.TESTS_FILE, cwd=out)
    assert test.returncode == 0, test.stdout + test.stderr
    assert "SUCCESS" in test.stdout


@needs_promtool
@pytest.mark.parametrize(("old", "new", "alert"), [
    ("circuit_breaker_state == 2", "circuit_breaker_state == 3", "MeshCircuitBreakerOpen"),
    ("> 0.05", "> 0.5", "MeshHighErrorRate"),
    ("> 0.8\n", "> 1.2\n", "MeshLatencyNearTimeout"),
    ("< 604800", "< 86400", "MeshCertificateExpiringSoon"),
    ("retry_budget_exhausted_total[5m]) > 0", "retry_budget_exhausted_total[5m]) > 5", "MeshRetryBudgetExhausted"),
])
def test_the_unit_tests_catch_a_broken_rule(tmp_path, old, new, alert):
    out = write(tmp_path)
    path = out / prometheus.RULES_FILE
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    test = promtool("test", "rules", prometheus.TESTS_FILE, cwd=out)
    assert test.returncode != 0
    assert f"alertname: {alert}" in test.stdout + test.stderr


@needs_promtool
def test_promtool_rejects_a_broken_config(tmp_path):
    out = write(tmp_path)
    (out / "prometheus.yml").write_text((out / "prometheus.yml").read_text().replace("scrape_interval: 15s",
                                                                                     "scrape_interval: soon"))
    assert promtool("check", "config", "prometheus.yml", cwd=out).returncode != 0


def test_local_config_for_the_deploy_script():
    cfg = prometheus.prometheus_config(MESH, {"auth-svc": "127.0.0.1:9101"}, {}, rule_files=("/x/rules/*.yml",))
    jobs = {j["job_name"] for j in cfg["scrape_configs"]}
    assert jobs == {"prometheus", "aivo-mesh"}
    assert cfg["rule_files"] == ["/x/rules/*.yml"]


# -- timeouts under the smallest bucket ----------------------------------------------------------------

def _tiny_timeouts_mesh():
    """mesh.yaml with timeouts whose 80 % is under (1ms, 2ms) or just over (7ms) the 5 ms bucket."""
    from aivo_mesh.config.loader import parse_mesh

    text = (ROOT / "mesh.yaml").read_text()
    text = text.replace("timeout: 1s\n        idempotent: true", "timeout: 1ms\n        idempotent: true", 1)
    text = text.replace("      - match: /aivo.auth.v1.AuthService/ValidateToken\n",
                        "      - match: /aivo.auth.v1.AuthService/Authenticate\n        timeout: 7ms\n"
                        "      - match: /aivo.auth.v1.AuthService/ValidateToken\n", 1)
    text = text.replace("    timeout: 20s\n", "    timeout: 2ms\n", 1)
    return parse_mesh(text, "tiny.yaml")


def test_a_timeout_under_the_smallest_bucket_renders_a_rule_at_that_bucket():
    mesh = _tiny_timeouts_mesh()
    rendered: dict[str, Any] = prometheus.render(mesh)  # raised "max() arg is an empty sequence" on a 1ms route
    latency = {(r["labels"]["route"], r["labels"]["route_timeout"]): r
               for r in rendered[prometheus.RULES_FILE]["groups"][0]["rules"] if r["alert"] == "MeshLatencyNearTimeout"}
    one_ms = latency[("/aivo.auth.v1.AuthService/ValidateToken", "1ms")]
    assert one_ms["expr"].endswith("> 0.005")  # a p99 inside the first bucket reads up to 4.95 ms
    assert "smallest bucket" in one_ms["annotations"]["description"]
    assert latency[("default", "2ms")]["expr"].endswith("> 0.005")
    seven_ms = latency[("/aivo.auth.v1.AuthService/Authenticate", "7ms")]
    assert seven_ms["expr"].endswith("> 0.0056")
    assert "smallest bucket" not in seven_ms["annotations"]["description"]


@needs_promtool
def test_promtool_passes_the_unit_tests_of_tiny_timeouts(tmp_path):
    out = tmp_path / "prometheus"
    for rel, text in render_target("prometheus", _tiny_timeouts_mesh()).items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    test = promtool("test", "rules", prometheus.TESTS_FILE, cwd=out)
    assert test.returncode == 0, test.stdout + test.stderr
