"""mesh.yaml -> Prometheus configuration, alerting rules and their promtool unit tests.

    prometheus.yml                 scrape every service's aivo-mesh admin endpoint (`/metrics` at
                                   <svc>:<admin_port>) and every Envoy sidecar's Prometheus listener
                                   (`/stats/prometheus` at <svc>:15090); rule_files: rules/*.yml
    rules/mesh-alerts.yml          the mesh's alerts (below)
    tests/mesh-alerts.test.yml     `promtool test rules` cases: each alert fires on a synthetic
                                   series, and none fires on a healthy mesh

Alerts (metric names from aivo_mesh.telemetry.metrics):

    MeshCircuitBreakerOpen       circuit_breaker_state == 2 for 1m (per caller instance and target)
    MeshHighErrorRate            server-side non-OK ratio over 5 % for 5m, per service
    MeshLatencyNearTimeout       server-side p99 over 80 % of the route's timeout, one rule per route
                                 and one per service for its other methods (timeouts from mesh.yaml)
    MeshCertificateExpiringSoon  mtls_certificate_expiry_seconds < 7 days
    MeshRetryBudgetExhausted     increase(retry_budget_exhausted_total[5m]) > 0

The latency histogram's largest finite bucket is 10 s (OpenTelemetry's RPC buckets). A p99 beyond it
reads as exactly 10 s, so for timeouts whose 80 % exceeds 10 s the rule fires at p99 >= 10 s instead
(earlier than 80 %, never silently never) and says so in its description. At the other end, a p99
interpolated inside the smallest bucket (5 ms) reads as up to 4.95 ms however fast the calls are, so
for timeouts whose 80 % is under 5 ms the rule fires at p99 > 5 ms (later than 80 %, never on every
call) and says so too.

Targets use the label `mesh_service`, never `service`: that name is a label of the metrics themselves
(the target service of a client-side series), and a target label would rename it to `exported_service`.

Pure and deterministic: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aivo_mesh.buckets import DURATION_BUCKETS
from aivo_mesh.config.model import MeshSpec, ServiceSpec, format_duration
from aivo_mesh.config.patterns import covers, is_prefix
from aivo_mesh.config.ports import POD_STATS_PORT
from aivo_mesh.config.resolve import route_policies
from aivo_mesh.render import Document

SCRAPE_INTERVAL = "15s"
MAX_BUCKET = max(DURATION_BUCKETS)
MIN_BUCKET = min(DURATION_BUCKETS)
LATENCY_FRACTION = 0.8
ERROR_RATIO = 0.05
CERT_WARNING_SECONDS = 7 * 86400
RULES_FILE = "rules/mesh-alerts.yml"
TESTS_FILE = "tests/mesh-alerts.test.yml"
ALERTS = ("MeshCircuitBreakerOpen", "MeshHighErrorRate", "MeshLatencyNearTimeout", "MeshCertificateExpiringSoon",
          "MeshRetryBudgetExhausted")


# -- scrape configuration ----------------------------------------------------------------------------

def _targets(targets: Mapping[str, str]) -> list[dict[str, Any]]:
    return [{"targets": [addr], "labels": {"mesh_service": name}} for name, addr in targets.items()]


def prometheus_config(mesh: MeshSpec, aivo: Mapping[str, str], envoy: Mapping[str, str], *,
                      envoy_path: str = "/stats/prometheus", rule_files: tuple[str, ...] = ("rules/*.yml",),
                      ) -> dict[str, Any]:
    """A prometheus.yml for given targets (service -> host:port): `aivo` serve `/metrics`, `envoy`
    serve `envoy_path`. The deploy script reuses this for a mesh running on loopback."""
    scrapes: list[dict[str, Any]] = [
        {"job_name": "prometheus", "static_configs": [{"targets": ["localhost:9090"]}]},
        {"job_name": "aivo-mesh", "metrics_path": "/metrics", "static_configs": _targets(aivo)},
    ]
    if envoy:
        scrapes.append({"job_name": "envoy", "metrics_path": envoy_path, "static_configs": _targets(envoy)})
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL,
                   "external_labels": {"mesh": mesh.mesh.name}},
        "rule_files": list(rule_files),
        "scrape_configs": scrapes,
    }


def pod_config(mesh: MeshSpec) -> dict[str, Any]:
    """Compose/pod profile: services by host name, admin ports from mesh.yaml, Envoy on 15090."""
    aivo = {s.name: f"{s.name}:{s.admin_port}" for s in mesh.services if s.admin_port is not None}
    envoy = {s.name: f"{s.name}:{POD_STATS_PORT}" for s in mesh.services}
    return prometheus_config(mesh, aivo, envoy)


# -- alerting rules ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LatencyRule:
    """One p99-vs-timeout rule: `matchers` select the methods, `threshold` is in seconds."""

    service: str
    route: str  # the route's match, or "default" for the service's other methods
    timeout: float
    matchers: str
    threshold: float
    clamped: bool  # 80 % of the timeout is past the largest bucket: fires at p99 >= MAX_BUCKET
    floored: bool = False  # 80 % of the timeout is under the smallest bucket: fires at p99 > MIN_BUCKET

    @property
    def expr(self) -> str:
        op = ">=" if self.clamped else ">"
        return (f"histogram_quantile(0.99, sum by (le, service, method) "
                f"(rate(grpc_request_duration_seconds_bucket{{{self.matchers}}}[5m]))) {op} {_num(self.threshold)}")


def _num(x: float) -> str:
    return f"{x:.6f}".rstrip("0").rstrip(".")


def promql_regex(patterns: list[str]) -> str:
    """An RE2 alternation of literal method paths (`/x/` prefixes match their methods), as the body
    of a PromQL double-quoted string (backslashes doubled)."""
    alts = [re.escape(p) + (".+" if is_prefix(p) else "") for p in patterns]
    return "|".join(alts).replace("\\", "\\\\")


def latency_rules(mesh: MeshSpec, svc: ServiceSpec) -> list[LatencyRule]:
    base = f'side="server",service="{svc.name}"'
    rules: list[LatencyRule] = []
    *routes, catch_all = route_policies(mesh, svc.name)  # in match order

    def add(route: str, timeout: float, matchers: str) -> None:
        threshold = LATENCY_FRACTION * timeout
        clamped = threshold >= MAX_BUCKET
        floored = threshold < MIN_BUCKET
        rules.append(LatencyRule(svc.name, route, timeout, matchers, min(max(threshold, MIN_BUCKET), MAX_BUCKET),
                                 clamped, floored))

    patterns = [rp.pattern for rp in routes]
    for i, rp in enumerate(routes):
        if not is_prefix(rp.pattern):
            add(rp.pattern, rp.timeout, f'{base},method="{rp.pattern}"')
            continue
        matchers = f'{base},method=~"{promql_regex([rp.pattern])}"'
        # The methods a more specific route (earlier in match order) takes are that route's.
        if covered := [p for p in patterns[:i] if covers(rp.pattern, p)]:
            matchers += f',method!~"{promql_regex(covered)}"'
        add(rp.pattern, rp.timeout, matchers)
    default = f"{base},method!~\"{promql_regex(patterns)}\"" if patterns else base
    add("default", catch_all.timeout, default)
    return rules


def _latency_alert(rule: LatencyRule) -> dict[str, Any]:
    scope = f"route {rule.route}" if rule.route != "default" else "methods without their own route"
    note = (f" (80 % of {format_duration(rule.timeout)} is beyond the histogram's largest bucket, "
            f"{_num(MAX_BUCKET)}s: this fires at p99 >= {_num(MAX_BUCKET)}s)") if rule.clamped else ""
    if rule.floored:
        note = (f" (80 % of {format_duration(rule.timeout)} is under the histogram's smallest bucket, "
                f"{_num(MIN_BUCKET)}s: this fires at p99 > {_num(MIN_BUCKET)}s)")
    return {
        "alert": "MeshLatencyNearTimeout",
        "expr": rule.expr,
        "for": "5m",
        "labels": {"severity": "warning", "route": rule.route, "route_timeout": format_duration(rule.timeout)},
        "annotations": {
            "summary": "{{ $labels.service }} {{ $labels.method }}: p99 latency near its timeout",
            "description": (f"Server-side p99 of {{{{ $labels.method }}}} on {rule.service} ({scope}) is above "
                            f"{_num(rule.threshold)}s, 80 % of its {format_duration(rule.timeout)} timeout in "
                            f"mesh.yaml{note}. Callers will soon see DEADLINE_EXCEEDED."),
        },
    }


def alert_rules(mesh: MeshSpec) -> dict[str, Any]:
    rules: list[dict[str, Any]] = [
        {
            "alert": "MeshCircuitBreakerOpen",
            "expr": "circuit_breaker_state == 2",
            "for": "1m",
            "labels": {"severity": "critical"},
            "annotations": {
                "summary": "Circuit breaker to {{ $labels.service }} open for over 1 minute",
                "description": ("{{ $labels.instance }} has refused calls to {{ $labels.service }} for over a "
                                "minute (breaker OPEN). Check the target's health; reset: "
                                "POST /clusters/{{ $labels.service }}/circuit_breakers/reset on the caller's "
                                "admin endpoint."),
            },
        },
        {
            "alert": "MeshHighErrorRate",
            "expr": (f'sum by (service) (rate(grpc_requests_total{{side="server",status!="OK"}}[5m]))\n'
                     f'  / sum by (service) (rate(grpc_requests_total{{side="server"}}[5m])) > {ERROR_RATIO}'),
            "for": "5m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "{{ $labels.service }} answers over 5 % of calls with an error",
                "description": ("More than 5 % of the calls {{ $labels.service }} served in the last 5 minutes "
                                "ended with a status other than OK."),
            },
        },
    ]
    for svc in mesh.services:
        rules.extend(_latency_alert(r) for r in latency_rules(mesh, svc))
    rules += [
        {
            "alert": "MeshCertificateExpiringSoon",
            "expr": f"mtls_certificate_expiry_seconds < {CERT_WARNING_SECONDS}",
            "for": "5m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "mTLS certificate of {{ $labels.service }} expires within 7 days",
                "description": ("The certificate {{ $labels.instance }} serves as {{ $labels.service }} expires in "
                                "under 7 days (negative: already expired). Rotate it: "
                                "meshctl certs rotate {{ $labels.service }}."),
            },
        },
        {
            "alert": "MeshRetryBudgetExhausted",
            "expr": "increase(retry_budget_exhausted_total[5m]) > 0",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "Retry budget to {{ $labels.service }} exhausted",
                "description": ("{{ $labels.instance }} skipped retries to {{ $labels.service }} in the last 5 "
                                "minutes because its retry budget was spent: the target is failing more "
                                "calls than retries may cover."),
            },
        },
    ]
    return {"groups": [{"name": "aivo-mesh", "rules": rules}]}


# -- promtool unit tests -----------------------------------------------------------------------------

def _expand(template: str, labels: Mapping[str, str]) -> str:
    """The annotation Prometheus sends for `labels` (our templates only use `{{ $labels.x }}`)."""
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), template)


def _expected(rule: dict[str, Any], labels: Mapping[str, str]) -> dict[str, Any]:
    all_labels = {**labels, **rule["labels"]}
    return {"exp_labels": all_labels,
            "exp_annotations": {k: _expand(v, all_labels) for k, v in rule["annotations"].items()}}


def _series(name: str, labels: Mapping[str, str]) -> str:
    body = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{body}}}"


# Each bucket's upper bound and its `le` label, written once (a mesh's tests hold thousands of histograms).
_BUCKETS: tuple[tuple[float, str], ...] = (*((le, _num(le)) for le in DURATION_BUCKETS), (float("inf"), "+Inf"))


def _histogram(labels: Mapping[str, str], per_minute: Callable[[float], int]) -> list[dict[str, str]]:
    """Bucket series growing every minute by `per_minute(le)` observations at or below `le` (`labels`
    without `le`)."""
    assert "le" not in labels
    prefix = _series("grpc_request_duration_seconds_bucket", labels)[:-1]  # up to the closing brace
    return [{"series": f'{prefix}{"," if labels else ""}le="{le_label}"}}', "values": f"0+{per_minute(le)}x15"}
            for le, le_label in _BUCKETS]


def _at_or_above(bound: float, n: int = 10) -> Callable[[float], int]:
    """Per-minute bucket increments when every observation lies in the bucket whose upper bound is `bound`."""
    def per_minute(le: float) -> int:
        return n if le >= bound else 0
    return per_minute


def _rule_by_name(rules: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in rules["groups"][0]["rules"] if r["alert"] == name)


def _method_for(svc: ServiceSpec, rule: LatencyRule) -> str:
    if rule.route == "default":
        return f"/{svc.grpc_service}/NoRouteOfItsOwn"
    return rule.route + "AnyMethod" if is_prefix(rule.route) else rule.route


def unit_tests(mesh: MeshSpec) -> dict[str, Any]:
    rules = alert_rules(mesh)
    first = mesh.services[0]
    callee = first.name
    caller = f"{mesh.services[-1].name}:{mesh.services[-1].admin_port or 0}"
    client = {"job": "aivo-mesh", "instance": caller, "service": callee}
    tests: list[dict[str, Any]] = []

    # A healthy mesh: nothing fires.
    healthy: list[dict[str, str]] = [
        {"series": _series("circuit_breaker_state", client), "values": "0x15"},
        {"series": _series("retry_budget_exhausted_total", client), "values": "0x15"},
        {"series": _series("mtls_certificate_expiry_seconds", {**client, "instance": f"{callee}:0"}),
         "values": f"{30 * 86400}-60x15"},
    ]
    for svc in mesh.services:
        server = {"job": "aivo-mesh", "instance": f"{svc.name}:{svc.admin_port or 0}", "side": "server",
                  "service": svc.name}
        for rule in latency_rules(mesh, svc):
            labels = {**server, "method": _method_for(svc, rule)}
            healthy.append({"series": _series("grpc_requests_total", {**labels, "status": "OK"}), "values": "0+100x15"})
            healthy.append({"series": _series("grpc_requests_total", {**labels, "status": "INVALID_ARGUMENT"}),
                            "values": "0+1x15"})
            healthy.extend(_histogram(labels, _at_or_above(0.005, 100)))  # all within 5 ms
    tests.append({"name": "healthy mesh: no alert", "interval": "1m", "input_series": healthy,
                  "alert_rule_test": [{"eval_time": "14m", "alertname": a, "exp_alerts": []} for a in ALERTS]})

    # Breaker open: pending until it has been open for 1m, then firing.
    tests.append({
        "name": "MeshCircuitBreakerOpen fires after 1m OPEN",
        "interval": "1m",
        "input_series": [{"series": _series("circuit_breaker_state", client), "values": "0 0 2 2 2 2 1 0"}],
        "alert_rule_test": [
            {"eval_time": "2m", "alertname": "MeshCircuitBreakerOpen", "exp_alerts": []},
            {"eval_time": "4m", "alertname": "MeshCircuitBreakerOpen",
             "exp_alerts": [_expected(_rule_by_name(rules, "MeshCircuitBreakerOpen"), client)]},
            {"eval_time": "7m", "alertname": "MeshCircuitBreakerOpen", "exp_alerts": []},
        ],
    })

    # 10 % UNAVAILABLE on one service, 1 % on another: only the first alerts.
    second = mesh.services[1] if len(mesh.services) > 1 else None
    err_series = []
    error_shares = [(first, 10)] + ([(second, 1)] if second is not None else [])
    for svc, bad in error_shares:
        labels = {"job": "aivo-mesh", "instance": f"{svc.name}:0", "side": "server", "service": svc.name,
                  "method": f"/{svc.grpc_service}/Any"}
        err_series.append({"series": _series("grpc_requests_total", {**labels, "status": "OK"}),
                           "values": f"0+{100 - bad}x15"})
        err_series.append({"series": _series("grpc_requests_total", {**labels, "status": "UNAVAILABLE"}),
                           "values": f"0+{bad}x15"})
    tests.append({"name": "MeshHighErrorRate fires over 5 % errors", "interval": "1m", "input_series": err_series,
                  "alert_rule_test": [
                      {"eval_time": "3m", "alertname": "MeshHighErrorRate", "exp_alerts": []},  # pending (for: 5m)
                      {"eval_time": "14m", "alertname": "MeshHighErrorRate",
                       "exp_alerts": [_expected(_rule_by_name(rules, "MeshHighErrorRate"), {"service": first.name})]},
                  ]})

    # Every latency rule: all calls of its methods slower than the largest bucket -> p99 reads 10 s.
    lat_series: list[dict[str, str]] = []
    lat_expected: list[dict[str, Any]] = []
    for svc in mesh.services:
        for rule in latency_rules(mesh, svc):
            method = _method_for(svc, rule)
            labels = {"job": "aivo-mesh", "instance": f"{svc.name}:0", "side": "server", "service": svc.name,
                      "method": method}
            lat_series.extend(_histogram(labels, _at_or_above(float("inf"))))
            lat_expected.append(_expected(_latency_alert(rule), {"service": svc.name, "method": method}))
    tests.append({"name": "MeshLatencyNearTimeout fires for every route and service default", "interval": "1m",
                  "input_series": lat_series,
                  "alert_rule_test": [{"eval_time": "14m", "alertname": "MeshLatencyNearTimeout",
                                       "exp_alerts": lat_expected}]})

    # A route with a sub-second timeout: p99 just under 80 % stays quiet, just over fires, and the
    # service default (longer timeout) does not fire for that route's method. Only a route whose
    # "well under" still has a bucket of its own (a 1ms or 7ms route has none).
    short = next(((svc, r) for svc in mesh.services for r in latency_rules(mesh, svc)
                  if r.route != "default" and not r.clamped and r.threshold < 1.0
                  and r.threshold / 1.25 >= MIN_BUCKET), None)
    if short is not None:
        svc, rule = short
        labels = {"job": "aivo-mesh", "instance": f"{svc.name}:0", "side": "server", "service": svc.name,
                  "method": _method_for(svc, rule)}
        below = max(b for b in DURATION_BUCKETS if b <= rule.threshold / 1.25)  # p99 well under the threshold
        above = min(b for b in DURATION_BUCKETS if b > rule.threshold)  # the bucket holding p99 > threshold
        quiet = _histogram({**labels, "instance": f"{svc.name}:1"}, _at_or_above(below))
        noisy = _histogram(labels, _at_or_above(above))
        tests.append({"name": f"MeshLatencyNearTimeout on {rule.route}: {format_duration(rule.timeout)} timeout",
                      "interval": "1m", "input_series": quiet,
                      "alert_rule_test": [{"eval_time": "14m", "alertname": "MeshLatencyNearTimeout",
                                           "exp_alerts": []}]})
        tests.append({"name": f"MeshLatencyNearTimeout on {rule.route}: over 80 %", "interval": "1m",
                      "input_series": noisy,
                      "alert_rule_test": [{"eval_time": "14m", "alertname": "MeshLatencyNearTimeout",
                                           "exp_alerts": [_expected(_latency_alert(rule),
                                                                    {"service": svc.name,
                                                                     "method": labels["method"]})]}]})

    # Certificate with 6 days left (and one with 20 days).
    cert = {"job": "aivo-mesh", "instance": f"{callee}:0", "service": callee}
    cert_series = [{"series": _series("mtls_certificate_expiry_seconds", cert), "values": f"{6 * 86400}-60x15"}]
    if second is not None:
        other = {"job": "aivo-mesh", "instance": f"{second.name}:0", "service": second.name}
        cert_series.append({"series": _series("mtls_certificate_expiry_seconds", other),
                            "values": f"{20 * 86400}-60x15"})
    tests.append({
        "name": "MeshCertificateExpiringSoon fires under 7 days",
        "interval": "1m",
        "input_series": cert_series,
        "alert_rule_test": [{"eval_time": "10m", "alertname": "MeshCertificateExpiringSoon",
                             "exp_alerts": [_expected(_rule_by_name(rules, "MeshCertificateExpiringSoon"), cert)]}],
    })

    # Retry budget exhausted twice in the window.
    tests.append({
        "name": "MeshRetryBudgetExhausted fires on any exhaustion in 5m",
        "interval": "1m",
        "input_series": [{"series": _series("retry_budget_exhausted_total", client),
                          "values": "0 0 0 1 2 2 2 2 2 2 2 2"}],
        "alert_rule_test": [
            {"eval_time": "2m", "alertname": "MeshRetryBudgetExhausted", "exp_alerts": []},
            {"eval_time": "5m", "alertname": "MeshRetryBudgetExhausted",
             "exp_alerts": [_expected(_rule_by_name(rules, "MeshRetryBudgetExhausted"), client)]},
            {"eval_time": "11m", "alertname": "MeshRetryBudgetExhausted", "exp_alerts": []},
        ],
    })
    return {"rule_files": [f"../{RULES_FILE}"], "evaluation_interval": "1m", "tests": tests}


def render(mesh: MeshSpec) -> dict[str, Document]:
    return {
        "prometheus.yml": pod_config(mesh),
        RULES_FILE: alert_rules(mesh),
        TESTS_FILE: unit_tests(mesh),
    }
