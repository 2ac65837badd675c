"""mesh.yaml: effective values, every error located (path, message, line), the CLI, the environment."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import meshctl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_schema import schema_errors

from aivo_mesh.config import (
    EnvSettings,
    MeshSpec,
    apply_env,
    find_mesh_file,
    format_duration,
    load_mesh,
    parse_duration,
    parse_mesh,
    route_policy,
    service_policy,
)
from aivo_mesh.config.resolve import merge, per_try_not_applied
from aivo_mesh.errors import ConfigError
from aivo_mesh.policy import bind
from aivo_mesh.render import TARGETS, render_target

ROOT = Path(__file__).resolve().parents[1]
MESH_FILE = ROOT / "mesh.yaml"
MESH_TEXT = MESH_FILE.read_text(encoding="utf-8")
MESH_DATA: dict[str, Any] = yaml.safe_load(MESH_TEXT)
DESIGN_B = ROOT / "examples" / "mesh.design-b.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

AUTH, LEARNER, EVENTS, ANALYTICS = "auth-svc", "learner-svc", "event-collector-svc", "analytics-svc"
VALIDATE_TOKEN = "/aivo.auth.v1.AuthService/ValidateToken"


@pytest.fixture(scope="module")
def mesh() -> MeshSpec:
    return load_mesh(MESH_FILE)


# --------------------------------------------------------------------------- the shipped files


@pytest.mark.parametrize("path", [MESH_FILE, *EXAMPLES], ids=lambda p: p.name)
def test_shipped_files_validate(path: Path) -> None:
    m = load_mesh(path)
    assert len(m.services) == 4
    assert m.mesh.trust_domain == "aivo.local"


def test_design_b_example_exists() -> None:
    assert DESIGN_B in EXAMPLES


def test_effective_values_of_mesh_yaml(mesh: MeshSpec) -> None:
    timeouts = {name: service_policy(mesh, name).timeout for name in mesh.service_names}
    assert timeouts == {AUTH: 5.0, LEARNER: 10.0, EVENTS: 2.0, ANALYTICS: 20.0}
    retries = {name: service_policy(mesh, name).retry.max_retries for name in mesh.service_names}
    assert retries == {AUTH: 3, LEARNER: 3, EVENTS: 3, ANALYTICS: 2}

    for name in mesh.service_names:
        p = service_policy(mesh, name)
        cb = p.circuit_breaker
        assert (cb.mode, cb.consecutive_failures, cb.first_probe, cb.recovery_time, cb.half_open_max_calls) == (
            "consecutive", 5, 1.0, 60.0, 1)
        lim = p.limits
        assert (lim.max_connections, lim.max_pending_requests, lim.max_requests, lim.max_retries) == (
            1000, 100, 1000, 10)
        assert (p.retry.backoff.base, p.retry.backoff.max) == (0.1, 1.0)
        assert (p.retry_budget.percent, p.retry_budget.min_retry_concurrency) == (25.0, 3)
        assert p.health_check.interval == 30.0
        assert p.health_check.timeout == 5.0
        od = p.outlier_detection
        assert (od.consecutive_failures, od.interval, od.base_ejection_time, od.max_ejection_time) == (
            5, 1.0, 1.0, 60.0)
    # 3 retries x (up to) 1 s back-off: the platform design's "0.1 / 1 / 3".
    assert service_policy(mesh, AUTH).retry.retry_on == ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    assert service_policy(mesh, AUTH).retry.per_try_timeout == 1.0


def test_route_override(mesh: MeshSpec) -> None:
    rp = route_policy(mesh, AUTH, VALIDATE_TOKEN)
    assert rp.match == VALIDATE_TOKEN
    assert rp.timeout == 1.0
    assert rp.idempotent
    assert rp.retry.retry_on == ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "INTERNAL", "DEADLINE_EXCEEDED")
    assert rp.retry.per_try_timeout == 0.5
    # Keys the route does not write come from the service / defaults.
    assert rp.retry.max_retries == 3
    assert (rp.retry.backoff.base, rp.retry.backoff.max) == (0.1, 1.0)

    other = route_policy(mesh, AUTH, "/aivo.auth.v1.AuthService/Authenticate")
    assert other.match is None
    assert other.timeout == 5.0
    assert other.retry.retry_on == ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    assert other.retry.per_try_timeout is None  # not idempotent: the defaults' per-try timeout does not apply

    stream = route_policy(mesh, EVENTS, "/aivo.events.v1.EventCollectorService/CollectStream")
    assert (stream.timeout, stream.streaming) == (30.0, True)
    assert stream.retry.per_try_timeout is None  # it would cut the stream
    # A route without its own timeout inherits the service's.
    assert route_policy(mesh, LEARNER, "/aivo.learner.v1.LearnerService/GetProfile").timeout == 10.0


def test_partial_override_keeps_other_keys(mesh: MeshSpec) -> None:
    analytics = service_policy(mesh, ANALYTICS).retry
    assert analytics.max_retries == 2
    assert (analytics.backoff.base, analytics.backoff.max) == (0.1, 1.0)
    assert analytics.retry_on == ("UNAVAILABLE", "DEADLINE_EXCEEDED")


@pytest.mark.parametrize(("route", "applies"), [
    ("{match: /aivo.learner.v1.LearnerService/GetProfile, idempotent: true}", True),
    ("{match: /aivo.learner.v1.LearnerService/GetProfile}", False),  # not idempotent
    ("{match: /aivo.learner.v1.LearnerService/GetProfile, idempotent: true, streaming: true}", False),
    ("{match: /aivo.learner.v1.LearnerService/GetProfile, idempotent: true, retry: {max_retries: 0}}", False),
    ("{match: /aivo.learner.v1.LearnerService/GetProfile, idempotent: true, retry: {retry_on: [UNAVAILABLE]}}",
     False),  # the proxyless plane would not retry the attempt it cuts
])
def test_per_try_timeout_applies_only_where_both_planes_retry_the_attempt_it_cuts(route: str,
                                                                                   applies: bool) -> None:
    text = _edit("      - match: /aivo.learner.v1.LearnerService/GetProfile\n        idempotent: true",
                 f"      - {route}")
    m = parse_mesh(text)
    rp = route_policy(m, LEARNER, "/aivo.learner.v1.LearnerService/GetProfile")
    assert rp.retry.per_try_timeout == (1.0 if applies else None)
    written = merge(service_policy(m, LEARNER).retry, m.service(LEARNER).routes[0].retry)
    assert written.per_try_timeout == 1.0  # the defaults' value reaches the route, and the rule decides
    assert (per_try_not_applied(written, idempotent=rp.idempotent, streaming=rp.streaming) is None) == applies


def test_partial_backoff_override_layers_over_defaults() -> None:
    text = _edit("backoff: {base: 100ms, max: 1s}", "backoff: {base: 100ms, max: 5s}")
    text = _edit("retry: {max_retries: 2}", "retry: {backoff: {base: 2s}}", text)
    m = parse_mesh(text)
    b = service_policy(m, ANALYTICS).retry.backoff
    # `base: 2s` alone is valid: the effective max is the defaults' 5s, not the built-in 1s.
    assert (b.base, b.max) == (2.0, 5.0)
    assert service_policy(m, ANALYTICS).retry.max_retries == 3


def test_effective_values_of_design_b() -> None:
    m = load_mesh(DESIGN_B)
    expected = {AUTH: (5.0, 2), EVENTS: (10.0, 3), ANALYTICS: (20.0, 2), LEARNER: (15.0, 3)}
    got = {n: (service_policy(m, n).timeout, service_policy(m, n).retry.max_retries) for n in m.service_names}
    assert got == expected
    for name in m.service_names:
        p = service_policy(m, name)
        lim = p.limits
        assert (lim.max_connections, lim.max_pending_requests, lim.max_requests, lim.max_retries) == (
            100, 200, 500, 5)
        assert p.retry_budget.percent == 20.0
        assert p.retry_budget.min_retry_concurrency == 3
        cb = p.circuit_breaker
        assert (cb.consecutive_failures, cb.recovery_time, cb.half_open_max_calls) == (5, 60.0, 1)
        assert (p.retry.backoff.base, p.retry.backoff.max) == (0.1, 1.0)
    assert route_policy(m, AUTH, VALIDATE_TOKEN).timeout == 1.0
    # Apart from the table, design B is mesh.yaml.
    a = load_mesh(MESH_FILE)
    assert [s.model_dump(exclude={"timeout", "retry"}) for s in m.services] == [
        s.model_dump(exclude={"timeout", "retry"}) for s in a.services]
    assert (m.mesh, m.keepalive, m.observability) == (a.mesh, a.keepalive, a.observability)


@pytest.mark.parametrize(("text", "seconds"), [
    ("5s", 5.0), ("100ms", 0.1), ("1m", 60.0), ("1h", 3600.0), (5, 5.0), (2.5, 2.5), ("1.5s", 1.5),
    ("0", 0.0),
])
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("seconds", "text"), [(5.0, "5s"), (0.1, "100ms"), (60.0, "60s"), (1.5, "1500ms"),
                                               (0.0005, "0.5ms"), (0.0, "0s"),
                                               # 700ms reads back as 0.7000000000000001: exact seconds instead
                                               (0.7, "0.7s"), (1e-10, "0.0000000001s")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.floats(min_value=0, max_value=1e6, allow_nan=False))
@settings(max_examples=100, deadline=None)
def test_format_duration_round_trips(seconds: float) -> None:
    # Exactly: a local run hands its processes the mesh written with it (runtime.local.dump_mesh).
    assert parse_duration(format_duration(seconds)) == seconds


# --------------------------------------------------------------------------- bad inputs


def _edit(old: str, new: str, text: str = MESH_TEXT) -> str:
    assert text.count(old) == 1, f"{old!r} must occur exactly once"
    return text.replace(old, new)


def _data_edit(change: Callable[[dict[str, Any]], object]) -> str:
    data = copy.deepcopy(MESH_DATA)
    change(data)
    return yaml.safe_dump(data, sort_keys=False)


def _line_of(text: str, needle: str) -> int:
    assert text.count(needle) >= 1, needle
    return text[: text.index(needle)].count("\n") + 1


def _case(id: str, text: str, path: str, fragment: str, line_at: str | None = None) -> Any:
    """`line_at`: a snippet of `text` on the line the error must report (None: line not checked)."""
    line = _line_of(text, line_at) if line_at is not None else None
    return pytest.param(text, path, fragment, line, id=id)


def _delete_services(d: dict[str, Any]) -> None:
    d["services"] = []


BAD_INPUTS = [
    _case("unknown top-level key", _edit("keepalive:\n", "keepalve:\n"),
          "keepalve", "unknown key", "keepalve:"),
    _case("unknown nested key",
          _edit("timeout: 1s\n        idempotent: true", "timeout: 1s\n        idempotnt: true"),
          "services[0].routes[0].idempotnt", "unknown key", "idempotnt"),
    _case("unknown key in defaults", _edit("    max_pending_requests: 100", "    max_pending: 100"),
          "defaults.limits.max_pending", "unknown key", "max_pending:"),
    _case("bad duration",
          _edit("{team: learning}\n    timeout: 10s", "{team: learning}\n    timeout: 10 seconds"),
          "services[1].timeout", "expected a duration such as 5s, 100ms or 1m", "10 seconds"),
    _case("negative duration", _edit("recovery_time: 60s", "recovery_time: -60s"),
          "defaults.circuit_breaker.recovery_time", "non-negative duration", "-60s"),
    _case("zero timeout", _edit("  timeout: 5s\n  retry:", "  timeout: 0s\n  retry:"),
          "defaults.timeout", "greater than 0", "timeout: 0s"),
    _case("infinite duration", _edit("    timeout: 20s\n", "    timeout: .inf\n"),
          "services[3].timeout", "finite duration", ".inf"),
    _case("duration over a year", _edit("    timeout: 20s\n", "    timeout: 9000h\n"),
          "services[3].timeout", "at most 8760h", "9000h"),
    _case("huge integer duration", _edit("    timeout: 20s\n", "    timeout: " + "9" * 400 + "\n"),
          "services[3].timeout", "finite duration", "9999"),
    _case("missing required key", _edit("    port: 50051\n", ""),
          "services[0].port", "required key is missing", "- name: auth-svc"),
    _case("port out of range", _edit("    port: 50051\n", "    port: 70000\n"),
          "services[0].port", "less than or equal to 65535; got 70000", "70000"),
    _case("duplicate service name", _edit("  - name: learner-svc", "  - name: auth-svc"),
          "services[1].name", "duplicate service name 'auth-svc'", "- name: auth-svc\n    version: 1.0.0\n"
          "    grpc_service: aivo.learner"),
    _case("duplicate port", _edit("    port: 50052\n", "    port: 50051\n"),
          "services[1].port", "port 50051 is already used by services[0].port",
          "    port: 50051\n    local_port: 8082"),
    _case("duplicate sidecar port", _edit("inbound_port: 50062", "inbound_port: 50061"),
          "services[1].sidecar.inbound_port", "already used by services[0].sidecar.inbound_port",
          "inbound_port: 50061, outbound_port: 15002"),
    _case("bad service name", _edit("  - name: auth-svc", "  - name: Auth_Svc"),
          "services[0].name", "DNS label", "Auth_Svc"),
    _case("max_pending_requests 0", _edit("    max_pending_requests: 100", "    max_pending_requests: 0"),
          "defaults.limits.max_pending_requests", "never becomes healthy", "max_pending_requests: 0"),
    _case("unknown fault caller",
          _edit("        idempotent: true\n        retry: {retry_on:",
                "        idempotent: true\n"
                "        fault: {abort_status: INTERNAL, abort_percent: 5, callers: [lerner-svc]}\n"
                "        retry: {retry_on:"),
          "services[0].routes[0].fault.callers[0]", "unknown caller 'lerner-svc'", "lerner-svc"),
    _case("unknown caller in allow",
          _edit("from: [learner-svc, analytics-svc]", "from: [learner-svc, analytcs-svc]"),
          "services[0].allow[1].from[1]", "unknown caller 'analytcs-svc'", "analytcs-svc"),
    _case("empty allow from", _edit("      - from: [mesh-client, analytics-svc]", "      - from: []"),
          "services[1].allow[0].from", "at least 1 item", "from: []"),
    _case("route not of the service",
          _edit("match: /aivo.learner.v1.LearnerService/GetProfile",
                "match: /aivo.auth.v1.AuthService/GetProfile"),
          "services[1].routes[0].match", "is not a method of aivo.learner.v1.LearnerService",
          "/aivo.auth.v1.AuthService/GetProfile"),
    _case("duplicate route",
          _edit("        streaming: true\n        timeout: 10s\n",
                "        streaming: true\n        timeout: 10s\n"
                "      - match: aivo.events.v1.EventCollectorService/Collect\n        timeout: 9s\n"),
          "services[2].routes[3].match",
          "duplicate route '/aivo.events.v1.EventCollectorService/Collect': services[2].routes[0] already",
          "match: aivo.events.v1.EventCollectorService/Collect"),
    _case("duplicate whole-service route",
          _edit("match: /aivo.learner.v1.LearnerService/GetProfile\n        idempotent: true\n",
                "match: /aivo.learner.v1.LearnerService/\n        idempotent: true\n"
                "      - match: aivo.learner.v1.LearnerService\n"),
          "services[1].routes[1].match", "duplicate route '/aivo.learner.v1.LearnerService/'",
          "match: aivo.learner.v1.LearnerService\n"),
    _case("bad method pattern",
          _edit("match: /aivo.learner.v1.LearnerService/GetProfile", "match: not a method"),
          "services[1].routes[0].match", "expected a gRPC method", "not a method"),
    _case("allow method without its service",
          _edit("methods: [/aivo.events.v1.EventCollectorService/ListEvents]", "methods: [ListEvents]"),
          "services[2].allow[1].methods[0]",
          "'ListEvents' is not a method of aivo.events.v1.EventCollectorService "
          "(its methods: Collect, CollectStream, ListEvents)", "methods: [ListEvents]"),
    _case("allow method of another service",
          _edit("methods: [/aivo.events.v1.EventCollectorService/ListEvents]",
                "methods: [/aivo.learner.v1.LearnerService/ListEvents]"),
          "services[2].allow[1].methods[0]",
          "'/aivo.learner.v1.LearnerService/ListEvents' is not a method of aivo.events.v1.EventCollectorService",
          "LearnerService/ListEvents"),
    _case("misspelt route method",
          _edit("match: /aivo.learner.v1.LearnerService/GetProfile",
                "match: /aivo.learner.v1.LearnerService/GetProfil"),
          "services[1].routes[0].match",
          "'GetProfil' is not a method of aivo.learner.v1.LearnerService (its methods: ", "GetProfil"),
    _case("misspelt allow method",
          _edit("methods: [/aivo.events.v1.EventCollectorService/ListEvents]",
                "methods: [/aivo.events.v1.EventCollectorService/ListEvent]"),
          "services[2].allow[1].methods[0]",
          "'ListEvent' is not a method of aivo.events.v1.EventCollectorService "
          "(its methods: Collect, CollectStream, ListEvents): a route or rule for it never applies",
          "ListEvent]"),
    _case("bad allow method pattern",
          _edit("methods: [/aivo.events.v1.EventCollectorService/ListEvents]", "methods: ['a b']"),
          "services[2].allow[1].methods[0]", "expected a gRPC method", "methods: ['a b']"),
    _case("bad status code in retry_on", _edit("retry_on: [UNAVAILABLE, DEADLINE_EXCEEDED]",
                                               "retry_on: [UNAVAILBLE, DEADLINE_EXCEEDED]"),
          "defaults.retry.retry_on[0]", "expected one of 'OK'", "UNAVAILBLE"),
    _case("backoff max < base", _edit("backoff: {base: 100ms, max: 1s}", "backoff: {base: 2s, max: 1s}"),
          "defaults.retry.backoff", "must be >= base", "base: 2s"),
    _case("partial backoff below inherited max",
          _edit("retry: {max_retries: 2}", "retry: {backoff: {base: 2s}}"),
          "services[3].retry.backoff", "max (1.0s) must be >= base (2.0s)", "base: 2s"),
    _case("first_probe above recovery_time", _edit("first_probe: 1s", "first_probe: 2m"),
          "defaults.circuit_breaker", "first_probe (120.0s) must be <= recovery_time (60.0s)", "circuit_breaker:"),
    _case("zero first_probe", _edit("first_probe: 1s", "first_probe: 0s"),
          "defaults.circuit_breaker.first_probe", "greater than 0", "first_probe: 0s"),
    _case("max_retries above 10", _edit("    max_retries: 3\n", "    max_retries: 11\n"),
          "defaults.retry.max_retries", "less than or equal to 10", "max_retries: 11"),
    _case("canary not summing to 100", _edit("retry: {max_retries: 2}", "canary: {v1: 90, v2: 20}"),
          "services[3].canary", "add up to 100", "canary"),
    _case("wrong type: string for int", _edit("max_connections: 1000", "max_connections: lots"),
          "defaults.limits.max_connections", "expected an integer, got 'lots'", "lots"),
    _case("wrong type: bool for version", _edit("version: 1\n", "version: true\n"),
          "version", "expected 1, got true", "version: true"),
    _case("wrong type: bool for port", _edit("    port: 50051\n", "    port: true\n"),
          "services[0].port", "expected an integer, got true", "port: true"),
    _case("wrong type: quoted port", _edit("    port: 50051\n", "    port: \"50051\"\n"),
          "services[0].port", "expected an integer, got '50051' (it is quoted: remove the quotes)", "\"50051\""),
    _case("wrong type: fractional port", _edit("    port: 50051\n", "    port: 50051.0\n"),
          "services[0].port", "expected an integer, got 50051.0", "50051.0"),
    _case("wrong type: bool for max_retries", _edit("    max_retries: 3\n", "    max_retries: true\n"),
          "defaults.retry.max_retries", "expected an integer, got true", "max_retries: true"),
    _case("wrong type: string for bool",
          _edit("timeout: 1s\n        idempotent: true", "timeout: 1s\n        idempotent: \"yes\""),
          "services[0].routes[0].idempotent", "expected true or false, got 'yes'", "idempotent: \"yes\""),
    _case("wrong type: quoted bool", _edit("permit_without_calls: true", "permit_without_calls: \"off\""),
          "keepalive.permit_without_calls", "expected true or false, got 'off'", "permit_without_calls"),
    _case("wrong type: int for bool", _edit("enabled: false\n    otlp", "enabled: 1\n    otlp"),
          "observability.tracing.enabled", "expected true or false, got 1", "enabled: 1"),
    _case("wrong type: bool for percent", _edit("    percent: 25\n", "    percent: true\n"),
          "defaults.retry_budget.percent", "expected a number, got true", "percent: true"),
    _case("wrong type: quoted number", _edit("sample_ratio: 1.0", "sample_ratio: '0.5'"),
          "observability.tracing.sample_ratio", "expected a number, got '0.5' (it is quoted", "sample_ratio"),
    _case("wrong type: list for mapping", _edit("retry: {max_retries: 2}", "retry: [2]"),
          "services[3].retry", "valid dictionary", "retry: [2]"),
    _case("wrong type: mapping for bool", _edit("permit_without_calls: true", "permit_without_calls: {a: 1}"),
          "keepalive.permit_without_calls", "expected true or false, got {'a': 1}", "permit_without_calls"),
    _case("bad literal", _edit("mode: consecutive", "mode: sometimes"),
          "defaults.circuit_breaker.mode", "expected one of 'consecutive' or 'failure_rate'", "sometimes"),
    _case("unsupported version", _edit("version: 1\n", "version: 2\n"),
          "version", "expected one of 1", "version: 2"),
    _case("bad trust domain", _edit("trust_domain: aivo.local", "trust_domain: spiffe://aivo.local"),
          "mesh.trust_domain", "expected a trust domain", "spiffe://"),
    _case("bad endpoint", _edit("    retry: {max_retries: 2}\n", "    endpoints: ['10.0.0.1']\n"),
          "services[3].endpoints", "expected host:port", "endpoints"),
    _case("bad statsd address", _edit("address: 127.0.0.1:8125", "address: nope"),
          "observability.statsd.address", "expected host:port such as 127.0.0.1:8125, got 'nope'", "nope"),
    _case("statsd address without a port", _edit("address: 127.0.0.1:8125", "address: 'statsd:'"),
          "observability.statsd.address", "expected host:port", "statsd:"),
    _case("duplicate key", _edit("    timeout: 20s\n", "    timeout: 20s\n    timeout: 3s\n"),
          "services[3].timeout", "duplicate key", "timeout: 3s"),
    _case("non-string key", _edit("    retry: {max_retries: 2}\n", "    retry: {max_retries: 2}\n    1: x\n"),
          "services[3].1", "read as a YAML int", "1: x"),
    _case("recursive alias", "services: &s [*s]\n", "services[0]", "recursive YAML alias", "services"),
    _case("no services", _data_edit(_delete_services), "services", "expected at least 1 item"),
    _case("top level not a mapping", "- services\n- mesh\n",
          "", "expected a mapping at the top level, got a YAML list", "- services"),
    _case("top level a scalar", "just text\n", "", "got a YAML string"),
    _case("invalid YAML", _edit("  namespace: default\n", "  namespace: default\n   bad: [indent\n"),
          "", "not valid YAML", "bad: [indent"),
    _case("invalid YAML: tab", _edit("  namespace: default\n", "\tnamespace: default\n"),
          "", "not valid YAML", "\tnamespace"),
    _case("control character", _edit("  namespace: default\n", "  namespace: def\x00ault\n"),
          "", "not valid YAML", "def\x00ault"),
    _case("empty file", "", "", "the file is empty"),
    # Accepted once, then a traceback from `meshctl render consul` (Consul's Meta rules).
    # The schema's patterns are ECMAScript's: ASCII digits, `$` at the very end. So are the loader's.
    _case("name with a trailing newline", _edit("  - name: auth-svc\n", '  - name: "auth-svc\\n"\n'),
          "services[0].name", "expected a DNS label", "name: \"auth-svc"),
    _case("duration in non-ASCII digits", _edit("    timeout: 5s\n    routes:", "    timeout: \u0665s\n    routes:"),
          "services[0].timeout", "expected a duration", "timeout: \u0665s"),
    _case("metadata key with a space", _edit("metadata: {team: identity}", "metadata: {team: identity, a b: x}"),
          "services[0].metadata.a b", "a Consul Meta key", "metadata: {team: identity, a b"),
    _case("metadata key not ASCII", _edit("metadata: {team: identity}", "metadata: {équipe: identity}"),
          "services[0].metadata.équipe", "ASCII letters", "équipe"),
    _case("metadata key consul-", _edit("metadata: {team: identity}", "metadata: {consul-x: identity}"),
          "services[0].metadata.consul-x", "not starting with 'consul-'", "consul-x"),
    _case("metadata value too long", _edit("metadata: {team: identity}", f"metadata: {{team: {'x' * 513}}}"),
          "services[0].metadata.team", "at most 512 characters", "metadata: {team: xxx"),
    _case("metadata too many keys",
          _edit("metadata: {team: identity}", "metadata: {" + ", ".join(f"k{n}: v" for n in range(64)) + "}"),
          "services[0].metadata", "at most 63 keys", "metadata: {k0"),
    _case("version too long", _edit("version: 1.0.0\n    grpc_service: aivo.auth", f"version: 1.0.{'1' * 600}\n"
                                    "    grpc_service: aivo.auth"),
          "services[0].version", "at most 63 letters", "version: 1.0.111"),
    _case("version with a space", _edit("version: 1.0.0\n    grpc_service: aivo.auth", "version: 1.0 beta\n"
                                        "    grpc_service: aivo.auth"),
          "services[0].version", "Kubernetes label value", "version: 1.0 beta"),
    _case("only a comment", "# nothing here\n", "", "the file is empty"),
]


@pytest.mark.parametrize(("text", "path", "fragment", "line"), BAD_INPUTS)
def test_bad_input_is_located(text: str, path: str, fragment: str, line: int | None) -> None:
    with pytest.raises(ConfigError) as info:
        parse_mesh(text, "mesh.yaml")
    err = info.value
    assert err.file == "mesh.yaml"
    matching = [i for i in err.issues if i.yaml_path == path and fragment in i.message]
    assert matching, f"no issue at {path!r} containing {fragment!r} in:\n{err}"
    if line is not None:
        assert matching[0].line == line, str(err)
        shown = f"mesh.yaml:{line}: {path or '<root>'}: "
        assert shown in str(err)


_VALIDATE_RULE = "from: [learner-svc, analytics-svc]\n        methods: [/aivo.auth.v1.AuthService/ValidateToken]"


def test_authorizers_of_equal_rules_are_the_same_and_a_new_one_starts_with_no_decisions() -> None:
    """What MeshServer.update_authorizer compares: rules by value, so a fresh parse of the same mesh is no
    change; a changed rule makes an Authorizer whose cache holds nothing decided under the old rules."""
    from aivo_mesh.server.authz import Authorizer

    old = Authorizer(parse_mesh(MESH_TEXT), AUTH)
    learner = parse_mesh(MESH_TEXT).spiffe_id(LEARNER)
    assert old.allows(learner, VALIDATE_TOKEN)
    assert old.same_rules(Authorizer(parse_mesh(MESH_TEXT), AUTH))
    new = Authorizer(parse_mesh(_edit(_VALIDATE_RULE, "from: [analytics-svc]\n        methods: "
                                      "[/aivo.auth.v1.AuthService/ValidateToken]")), AUTH)
    assert not old.same_rules(new)
    assert not new.allows(learner, VALIDATE_TOKEN) and old.allows(learner, VALIDATE_TOKEN)


@pytest.mark.parametrize("written", ["aivo.auth.v1.AuthService", "/aivo.auth.v1.AuthService",
                                     "/aivo.auth.v1.AuthService/"])
def test_whole_service_allow_rule_is_the_service_prefix(written: str) -> None:
    """docs/config.md: `pkg.Service` means the prefix `/pkg.Service/`, so the rule allows every method."""
    from aivo_mesh.server.authz import Authorizer

    m = parse_mesh(_edit(_VALIDATE_RULE, f"from: [learner-svc, analytics-svc]\n        methods: [{written}]"))
    assert m.service(AUTH).allow[1].methods == ("/aivo.auth.v1.AuthService/",)
    authz = Authorizer(m, AUTH)
    learner = m.spiffe_id(LEARNER)
    assert authz.allows(learner, "/aivo.auth.v1.AuthService/Authenticate")
    assert authz.allows(learner, VALIDATE_TOKEN)
    assert not authz.allows(learner, "/aivo.auth.v1.AuthServiceX/Authenticate")  # not the same service
    assert not authz.allows(m.spiffe_id(EVENTS), VALIDATE_TOKEN)  # a caller no rule names


def test_whole_service_route_is_the_service_prefix() -> None:
    m = parse_mesh(_edit("match: /aivo.learner.v1.LearnerService/GetProfile",
                         "match: aivo.learner.v1.LearnerService"))
    assert m.service(LEARNER).routes[0].match == "/aivo.learner.v1.LearnerService/"
    rp = route_policy(m, LEARNER, "/aivo.learner.v1.LearnerService/UpdateProfile")
    assert (rp.match, rp.idempotent) == ("/aivo.learner.v1.LearnerService/", True)


def test_a_lone_recovery_time_below_the_inherited_first_probe_is_valid() -> None:
    # Only both keys written together the wrong way round are an error; here the breaker caps the
    # first probe at recovery_time (policy/breaker.py).

    m = parse_mesh(_edit("retry: {max_retries: 2}", "circuit_breaker: {recovery_time: 400ms}"))
    cb = service_policy(m, ANALYTICS).circuit_breaker
    assert (cb.first_probe, cb.recovery_time) == (1.0, 0.4)
    backoff = bind.breaker_params(cb).probe_backoff
    assert (backoff.base, backoff.cap) == (0.4, 0.4)


def test_bad_input_table_is_large_enough() -> None:
    assert len(BAD_INPUTS) >= 15


def test_every_issue_is_reported_not_only_the_first() -> None:
    text = _edit("max_connections: 1000", "max_connections: lots")
    text = _edit("recovery_time: 60s", "recovery_time: soon", text)
    with pytest.raises(ConfigError) as info:
        parse_mesh(text)
    assert {i.yaml_path for i in info.value.issues} == {
        "defaults.limits.max_connections", "defaults.circuit_breaker.recovery_time"}


def test_every_cross_reference_problem_is_reported_together() -> None:
    text = _edit("from: [learner-svc, analytics-svc]", "from: [learner-svc, analytcs-svc]")
    text = _edit("    port: 50052\n", "    port: 50051\n", text)
    text = _edit("    port: 50053\n", "    port: 50051\n", text)
    text = _edit("match: /aivo.learner.v1.LearnerService/GetProfile", "match: /aivo.auth.v1.AuthService/X", text)
    text = _edit("retry: {max_retries: 2}", "retry: {backoff: {base: 2s}}", text)
    with pytest.raises(ConfigError) as info:
        parse_mesh(text)
    assert [i.yaml_path for i in info.value.issues] == [
        "services[0].allow[1].from[1]", "services[1].routes[0].match", "services[1].port", "services[2].port",
        "services[3].retry.backoff"]
    # Both name the first user of the port, and each issue has its own line.
    assert all("already used by services[0].port" in i.message for i in info.value.issues[2:4])
    assert len({i.line for i in info.value.issues}) == 5


def test_huge_input_is_abbreviated_in_the_message() -> None:
    with pytest.raises(ConfigError) as info:
        parse_mesh(_edit("max_connections: 1000", "max_connections: " + "x" * 10_000))
    assert len(str(info.value)) < 300


def test_load_mesh_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_mesh(tmp_path / "missing.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError) as info:
        load_mesh(binary)
    assert info.value.file == str(binary)
    with pytest.raises(ConfigError, match="cannot read"):
        load_mesh(tmp_path)  # a directory


def test_find_mesh_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert find_mesh_file("x.yaml") == Path("x.yaml")
    monkeypatch.setenv("AIVO_MESH_CONFIG", str(tmp_path / "env.yaml"))
    assert find_mesh_file(None) == tmp_path / "env.yaml"
    monkeypatch.delenv("AIVO_MESH_CONFIG")
    monkeypatch.chdir(ROOT)
    assert find_mesh_file(None) == Path("mesh.yaml")


# --------------------------------------------------------------------------- fuzzing


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


MESH_PATHS = _paths(MESH_DATA)[1:]
# Every fuzzer prints `@reproduce_failure(...)` with its falsifying example, so a CI failure replays
# exactly (or run pytest with --hypothesis-seed=N to repeat a whole run).
_FUZZ = settings(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
_text = st.text(st.characters(codec="utf-8"), max_size=20)
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.just(10**400), st.floats(), _text,
    st.sampled_from(["5s", "-1s", "100ms", "1m", "UNAVAILABLE", "auth-svc", "", "0", "65536"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_text, inner, max_size=3)),
    max_leaves=6,
)
_SWAP: dict[type, Callable[[Any], Any]] = {
    str: lambda v: [v], int: str, float: lambda v: {"value": v}, bool: str, list: lambda v: {"items": v},
    dict: lambda v: list(v.values()), type(None): lambda v: 0,
}


def _get(data: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        data = data[p]
    return data


def _expect_config_error_or_mesh(text: str) -> None:
    error: ConfigError | None = None
    try:
        result = parse_mesh(text, "fuzz.yaml")
    except ConfigError as exc:
        error = exc
    if error is not None:
        assert error.issues
        assert all(i.message for i in error.issues)
        assert str(error).startswith("fuzz.yaml")
    else:
        assert isinstance(result, MeshSpec)
        from aivo_mesh.cli.config_cmd import effective_mesh

        json.dumps(effective_mesh(result))  # a valid mesh resolves and prints (every duration formats)
        for target in TARGETS:  # and every renderer is total on it: no traceback from `meshctl render`
            render_target(target, result)
        # mesh.schema.json is never stricter than the loader: an editor flags nothing config validate accepts.
        assert schema_errors(yaml.safe_load(text)) == []


@given(path=st.sampled_from(MESH_PATHS), op=st.sampled_from(["delete", "replace", "insert", "swap"]),
       value=_values, key=_text)
@settings(_FUZZ, max_examples=200)
def test_fuzz_data_mutations(path: tuple[Any, ...], op: str, value: Any, key: str) -> None:
    data = copy.deepcopy(MESH_DATA)
    parent, last = _get(data, path[:-1]), path[-1]
    if op == "delete":
        del parent[last]
    elif op == "replace":
        parent[last] = value
    elif op == "swap":
        parent[last] = _SWAP[type(parent[last])](parent[last])
    else:
        target = parent[last]
        if isinstance(target, dict):
            target[key or "x"] = value
        elif isinstance(target, list):
            target.append(value)
        else:
            parent[last] = {key: value}
    _expect_config_error_or_mesh(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))


_EDGE_SCALARS: list[object] = [
    10**400, -(10**400), float("inf"), float("-inf"), float("nan"), -1, 0, 0.0001, 1e308, True,
    None, "", "-1s", "1e400s", "9" * 400 + "h", "5 s", "5sec", "1.5.2s", [], {}]
_LEAVES = [p for p in MESH_PATHS if not isinstance(_get(MESH_DATA, p), dict | list)]
_DURATION_LEAVES = [p for p in _LEAVES
                    if isinstance(v := _get(MESH_DATA, p), str) and v[0].isdigit() and v[-1] == "s"]


def test_duration_leaves_found() -> None:
    assert len(_DURATION_LEAVES) >= 15


@given(path=st.sampled_from(_DURATION_LEAVES + _LEAVES), value=st.sampled_from(_EDGE_SCALARS))
@settings(_FUZZ, max_examples=200)
def test_fuzz_edge_values_at_leaves(path: tuple[Any, ...], value: Any) -> None:
    data = copy.deepcopy(MESH_DATA)
    _get(data, path[:-1])[path[-1]] = value
    _expect_config_error_or_mesh(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))


# Values of the right type and shape, so that most meshes are accepted and reach the renderers: the
# edge cases that pass the loader (a 1ms route timeout, a metadata key with a space) crashed renderers.
_DURATION_VALUES = st.one_of(
    st.integers(0, 100_000).map(lambda n: f"{n}ms"), st.integers(0, 10**6).map(lambda n: f"{n}s"),
    st.floats(0, 1e6, allow_nan=False), st.sampled_from(["1ms", "4ms", "5ms", "7ms", "0.5ms", "12.5s", "8760h"]),
)
_STRINGS = st.one_of(_text, st.text(st.characters(codec="ascii"), max_size=600),
                     st.sampled_from(["v2", "1.0.0-rc.1", "a b", "é", "consul-x", "x" * 513, "-", "."]))
_STRING_LEAVES = [p for p in _LEAVES if isinstance(_get(MESH_DATA, p), str) and p not in _DURATION_LEAVES]
_INT_LEAVES = [p for p in _LEAVES if type(_get(MESH_DATA, p)) is int]
_SERVICE = st.integers(0, len(MESH_DATA["services"]) - 1)
_mutation = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(_DURATION_LEAVES), _DURATION_VALUES),
    st.tuples(st.just("set"), st.sampled_from(_STRING_LEAVES), _STRINGS),
    st.tuples(st.just("set"), st.sampled_from(_INT_LEAVES), st.integers(-1, 70_000)),
    st.tuples(st.just("set"), _SERVICE.map(lambda i: ("services", i, "timeout")), _DURATION_VALUES),
    st.tuples(st.just("metadata"), _SERVICE, st.dictionaries(_STRINGS, _STRINGS, max_size=3)),
    st.tuples(st.just("set"), _SERVICE.map(lambda i: ("services", i, "tags")), st.lists(_STRINGS, max_size=3)),
    st.tuples(st.just("set"), _SERVICE.map(lambda i: ("services", i, "canary")),
              st.dictionaries(_STRINGS, st.integers(0, 100), max_size=3)),
)


@given(mutations=st.lists(_mutation, min_size=1, max_size=4))
@settings(_FUZZ, max_examples=200)
def test_fuzz_typed_values_reach_every_renderer(mutations: list[tuple[Any, ...]]) -> None:
    data = copy.deepcopy(MESH_DATA)
    for op, where, value in mutations:
        if op == "metadata":
            data["services"][where].setdefault("metadata", {}).update(value)
        else:
            try:
                _get(data, where[:-1])[where[-1]] = value
            except (KeyError, IndexError, TypeError):  # an earlier mutation replaced what held it
                continue
    _expect_config_error_or_mesh(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))


@given(offset=st.integers(0, len(MESH_TEXT)), junk=_text)
@settings(_FUZZ, max_examples=200)
def test_fuzz_text_truncation_and_insertion(offset: int, junk: str) -> None:
    _expect_config_error_or_mesh(MESH_TEXT[:offset])
    _expect_config_error_or_mesh(MESH_TEXT[:offset] + junk + MESH_TEXT[offset:])


@given(st.binary(max_size=200))
@settings(_FUZZ, max_examples=200)
def test_fuzz_random_bytes(raw: bytes) -> None:
    _expect_config_error_or_mesh(raw.decode("utf-8", errors="replace"))
    _expect_config_error_or_mesh(raw.decode("latin-1"))


def test_alias_bomb_is_refused_quickly() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    with pytest.raises(ConfigError, match="too large"):
        parse_mesh("\n".join(lines) + "\nservices: []\n")


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    bad = tmp_path / "bad.yaml"
    bad.write_text(_edit("recovery_time: 60s", "recovery_time: soon"), encoding="utf-8")
    return bad


def _main(argv: list[str]) -> int:
    from aivo_mesh.cli import main  # imported here: the CLI package pulls in every command group

    return main(argv)


def test_cli_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["config", "validate", str(MESH_FILE)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"{MESH_FILE}: OK — 4 services, trust domain aivo.local"


def test_cli_validate_default_file(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIVO_MESH_CONFIG", raising=False)
    monkeypatch.chdir(ROOT)
    assert _main(["config", "validate"]) == 0
    assert capsys.readouterr().out.startswith("mesh.yaml: OK — 4 services")


def test_cli_validate_bad(bad_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["config", "validate", str(bad_file)]) == 2
    err = capsys.readouterr().err
    line = _line_of(bad_file.read_text(), "recovery_time: soon")
    assert f"{bad_file}:{line}: defaults.circuit_breaker.recovery_time: expected a duration" in err
    assert "Traceback" not in err


def test_cli_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["config", "validate", str(tmp_path / "nope.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_console_script_exits_2_without_traceback(bad_file: Path) -> None:
    proc = meshctl("config", "validate", str(bad_file), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "defaults.circuit_breaker.recovery_time" in proc.stderr
    assert str(bad_file) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_show_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["config", "show", str(MESH_FILE)]) == 0
    out = capsys.readouterr().out
    assert "recovery_time: 60s" in out
    assert "base: 100ms" in out
    data = yaml.safe_load(out)
    services = {s["name"]: s for s in data["services"]}
    assert services[ANALYTICS]["retry"]["max_retries"] == 2
    assert services[ANALYTICS]["retry"]["backoff"] == {"base": "100ms", "max": "1s"}
    assert services[LEARNER]["timeout"] == "10s"
    assert services[LEARNER]["limits"]["max_connections"] == 1000
    assert services[AUTH]["routes"][0]["timeout"] == "1s"
    assert data["defaults"]["health_check"]["interval"] == "30s"
    assert data["http2"]["max_concurrent_streams"] == 1000  # a section mesh.yaml leaves out


def test_cli_show_output_is_a_valid_equivalent_mesh(
    capsys: pytest.CaptureFixture[str], mesh: MeshSpec
) -> None:
    assert _main(["config", "show", str(MESH_FILE)]) == 0
    first = capsys.readouterr().out
    assert _main(["config", "show", str(MESH_FILE)]) == 0
    assert capsys.readouterr().out == first  # deterministic
    again = parse_mesh(first, "shown.yaml")
    for name in mesh.service_names:
        a, b = service_policy(mesh, name), service_policy(again, name)
        assert (a.timeout, a.retry, a.retry_budget, a.limits, a.circuit_breaker, a.health_check) == (
            b.timeout, b.retry, b.retry_budget, b.limits, b.circuit_breaker, b.health_check)
        for r in mesh.service(name).routes:
            assert route_policy(mesh, name, r.match) == route_policy(again, name, r.match)


def test_cli_show_json_and_service(capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["config", "show", str(DESIGN_B), "-o", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["timeout"] for s in data["services"]] == ["5s", "15s", "10s", "20s"]
    assert data["defaults"]["retry_budget"]["percent"] == 20.0

    assert _main(["config", "show", str(MESH_FILE), "--service", EVENTS, "-o", "json"]) == 0
    svc = json.loads(capsys.readouterr().out)
    assert svc["name"] == EVENTS
    assert svc["timeout"] == "2s"
    assert [r["timeout"] for r in svc["routes"]] == ["2s", "30s", "10s"]
    assert svc["allow"][0]["from"] == ["mesh-client", "learner-svc"]


def test_config_show_and_a_local_run_write_the_model_alike(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, mesh: MeshSpec
) -> None:
    from aivo_mesh.runtime.local import dump_mesh

    written = dump_mesh(mesh)
    data = yaml.safe_load(written)
    assert data["defaults"]["retry"]["backoff"] == {"base": "100ms", "max": "1s"}
    assert _main(["config", "show", str(MESH_FILE), "--service", LEARNER]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert next(s for s in data["services"] if s["name"] == LEARNER)["timeout"] == shown["timeout"] == "10s"
    (tmp_path / "mesh.yaml").write_text(written)
    assert load_mesh(tmp_path / "mesh.yaml").model_dump() == mesh.model_dump()  # it means what it held


def test_cli_show_unknown_service(capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["config", "show", str(MESH_FILE), "--service", "nope"]) == 2
    assert "auth-svc" in capsys.readouterr().err


def test_cli_show_bad_file(bad_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["config", "show", str(bad_file)]) == 2
    assert "Traceback" not in capsys.readouterr().err


# --------------------------------------------------------------------------- environment

FULL_ENV = {
    "SERVICE_NAME": LEARNER,
    "SERVICE_VERSION": "2.3.1",
    "GRPC_PORT": "50152",
    "LOCAL_SERVICE_PORT": "8182",
    "CA_CERT_PATH": "/certs/ca.crt",
    "CLIENT_CERT_PATH": "/certs/learner.crt",
    "CLIENT_KEY_PATH": "/certs/learner.key",
    "JAEGER_HOST": "jaeger",
    "METRICS_HOST": "0.0.0.0",
}


def test_env_settings_full() -> None:
    env = EnvSettings.from_environ(FULL_ENV)
    assert env == EnvSettings(
        service_name=LEARNER, service_version="2.3.1", grpc_port=50152, local_service_port=8182,
        ca_cert_path=Path("/certs/ca.crt"), client_cert_path=Path("/certs/learner.crt"),
        client_key_path=Path("/certs/learner.key"), jaeger_host="jaeger", metrics_host="0.0.0.0",
    )
    assert env.otlp_endpoint == "http://jaeger:4317"
    with pytest.raises(AttributeError):
        env.grpc_port = 1  # type: ignore[misc]  # frozen


def test_env_settings_empty_and_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    assert EnvSettings.from_environ({}) == EnvSettings()
    assert EnvSettings.from_environ({"UNRELATED": "x"}).is_empty
    for var in FULL_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GRPC_PORT", "50051")
    assert EnvSettings.from_environ().grpc_port == 50051


@pytest.mark.parametrize(("value", "endpoint"), [
    ("jaeger", "http://jaeger:4317"),
    ("jaeger:14317", "http://jaeger:14317"),
    ("10.0.0.7", "http://10.0.0.7:4317"),
    ("http://jaeger.observability.svc:4317/", "http://jaeger.observability.svc:4317"),
    ("[::1]:4317", "http://[::1]:4317"),
])
def test_jaeger_host_to_otlp(value: str, endpoint: str) -> None:
    assert EnvSettings.from_environ({"JAEGER_HOST": value}).otlp_endpoint == endpoint


@pytest.mark.parametrize(("env", "var", "fragment"), [
    ({"GRPC_PORT": "abc"}, "GRPC_PORT", "expected an integer port 1-65535, got 'abc'"),
    ({"GRPC_PORT": "0"}, "GRPC_PORT", "expected an integer port 1-65535, got '0'"),
    ({"GRPC_PORT": "65536"}, "GRPC_PORT", "expected an integer port 1-65535"),
    ({"GRPC_PORT": "-1"}, "GRPC_PORT", "expected an integer port 1-65535"),
    ({"LOCAL_SERVICE_PORT": "80.5"}, "LOCAL_SERVICE_PORT", "expected an integer port 1-65535"),
    ({"SERVICE_NAME": ""}, "SERVICE_NAME", "expected a non-empty value"),
    ({"SERVICE_NAME": "   "}, "SERVICE_NAME", "expected a non-empty value"),
    ({"SERVICE_NAME": "Auth_Svc"}, "SERVICE_NAME", "expected a service name"),
    ({"SERVICE_VERSION": "1 2"}, "SERVICE_VERSION", "without spaces"),
    ({"CA_CERT_PATH": ""}, "CA_CERT_PATH", "expected a non-empty value"),
    ({"JAEGER_HOST": "jaeger:notaport"}, "JAEGER_HOST", "expected a host name or host:port"),
    ({"JAEGER_HOST": "jaeger:99999"}, "JAEGER_HOST", "expected a host name or host:port"),
    ({"JAEGER_HOST": "a b"}, "JAEGER_HOST", "expected a host name"),
    ({"METRICS_HOST": "prom:9090"}, "METRICS_HOST", "expected a host name"),
    ({"METRICS_HOST": ""}, "METRICS_HOST", "expected a non-empty value"),
])
def test_env_settings_invalid(env: dict[str, str], var: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        EnvSettings.from_environ(env)
    err = info.value
    assert err.file == "environment"
    assert [i.yaml_path for i in err.issues] == [var]
    assert fragment in err.issues[0].message
    assert str(err).startswith(f"environment: {var}: ")


def test_env_settings_reports_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        EnvSettings.from_environ({"GRPC_PORT": "abc", "LOCAL_SERVICE_PORT": "", "SERVICE_NAME": LEARNER})
    assert [i.yaml_path for i in info.value.issues] == ["GRPC_PORT", "LOCAL_SERVICE_PORT"]


def test_apply_env_overrides(mesh: MeshSpec) -> None:
    out = apply_env(mesh, EnvSettings.from_environ(FULL_ENV))
    learner = out.service(LEARNER)
    assert (learner.version, learner.port, learner.local_port) == ("2.3.1", 50152, 8182)
    assert out.observability.tracing.otlp_endpoint == "http://jaeger:4317"
    assert out.observability.tracing.enabled
    assert out.observability.metrics.host == "0.0.0.0"
    # Nothing else changes, and the layering of policy is untouched.
    assert out.service(AUTH) == mesh.service(AUTH)
    assert learner.routes == mesh.service(LEARNER).routes
    assert service_policy(out, LEARNER).timeout == 10.0
    assert service_policy(out, ANALYTICS).retry == service_policy(mesh, ANALYTICS).retry
    assert route_policy(out, AUTH, VALIDATE_TOKEN) == route_policy(mesh, AUTH, VALIDATE_TOKEN)
    # The input is not modified.
    assert mesh.service(LEARNER).port == 50052
    assert not mesh.observability.tracing.enabled


def test_apply_env_partial_and_empty(mesh: MeshSpec) -> None:
    assert apply_env(mesh, EnvSettings()) == mesh
    out = apply_env(mesh, EnvSettings.from_environ({"SERVICE_NAME": AUTH, "GRPC_PORT": "6000"}))
    auth = out.service(AUTH)
    assert (auth.port, auth.local_port, auth.version) == (6000, 8081, "1.0.0")
    # Keeping a service's own port is not a conflict.
    assert apply_env(mesh, EnvSettings(service_name=AUTH, grpc_port=50051)).service(AUTH).port == 50051
    only_metrics = apply_env(mesh, EnvSettings(metrics_host="10.1.2.3"))
    assert only_metrics.observability.metrics.host == "10.1.2.3"
    assert only_metrics.services == mesh.services


def test_apply_env_ignores_other_services_ports() -> None:
    """A deployed service has its own network namespace: every pod may listen on 50051."""
    from aivo_mesh.config import load_mesh

    mesh = load_mesh(MESH_FILE)
    applied = apply_env(mesh, EnvSettings(service_name="learner-svc", grpc_port=50051))
    assert applied.service("learner-svc").port == 50051 == applied.service("auth-svc").port


@pytest.mark.parametrize(("env", "var", "fragment"), [
    (EnvSettings(service_name="billing-svc"), "SERVICE_NAME",
     "unknown service 'billing-svc': mesh.yaml defines auth-svc, learner-svc, event-collector-svc, "
     "analytics-svc"),
    (EnvSettings(grpc_port=6000), "SERVICE_NAME", "required when GRPC_PORT is set"),
    (EnvSettings(service_name=AUTH, local_service_port=9901), "LOCAL_SERVICE_PORT",
     "already used by auth-svc (services[0].sidecar.admin_port)"),
    (EnvSettings(service_name=AUTH, grpc_port=7000, local_service_port=7000), "LOCAL_SERVICE_PORT",
     "port 7000 is already used by auth-svc (GRPC_PORT)"),
    (EnvSettings(jaeger_host="not a host"), "JAEGER_HOST", "expected a host name"),
])
def test_apply_env_errors(mesh: MeshSpec, env: EnvSettings, var: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_env(mesh, env)
    assert info.value.file == "environment"
    assert any(i.yaml_path == var and fragment in i.message for i in info.value.issues), str(info.value)


# The standard OpenTelemetry variables, next to JAEGER_HOST.

@pytest.mark.parametrize(("value", "endpoint"), [
    ("http://otel-collector:4317", "http://otel-collector:4317"),
    ("https://otel.example.com", "https://otel.example.com:4317"),
    ("HTTP://Collector.observability.svc:14317/", "http://Collector.observability.svc:14317"),
    ("http://collector:4317/v1/traces", "http://collector:4317"),  # OTLP/gRPC does not use a path
    ("http://[::1]:4317", "http://[::1]:4317"),
])
def test_otel_exporter_otlp_endpoint(value: str, endpoint: str) -> None:
    assert EnvSettings.from_environ({"OTEL_EXPORTER_OTLP_ENDPOINT": value}).tracing_endpoint == endpoint


@pytest.mark.parametrize(("env", "var", "fragment"), [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"}, "OTEL_EXPORTER_OTLP_ENDPOINT",
     "expected an OTLP/gRPC endpoint URL such as http://otel-collector:4317"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "grpc://collector:4317"}, "OTEL_EXPORTER_OTLP_ENDPOINT", "endpoint URL"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:99999"}, "OTEL_EXPORTER_OTLP_ENDPOINT", "endpoint URL"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, "OTEL_EXPORTER_OTLP_ENDPOINT", "expected a non-empty value"),
    ({"OTEL_SERVICE_NAME": " "}, "OTEL_SERVICE_NAME", "expected a non-empty value"),
    ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER",
     "expected one of parentbased_traceidratio, parentbased_always_on"),
    ({"OTEL_TRACES_SAMPLER_ARG": "half"}, "OTEL_TRACES_SAMPLER_ARG", "expected a sampling ratio from 0 to 1"),
    ({"OTEL_TRACES_SAMPLER_ARG": "1.5"}, "OTEL_TRACES_SAMPLER_ARG", "expected a sampling ratio"),
    ({"OTEL_TRACES_SAMPLER_ARG": "nan"}, "OTEL_TRACES_SAMPLER_ARG", "expected a sampling ratio"),
])
def test_otel_variables_invalid(env: dict[str, str], var: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        EnvSettings.from_environ(env)
    assert [i.yaml_path for i in info.value.issues] == [var]
    assert fragment in info.value.issues[0].message


def test_apply_env_honours_the_otel_variables(mesh: MeshSpec) -> None:
    env = EnvSettings.from_environ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://otel.example.com:4317",
                                    "OTEL_SERVICE_NAME": "auth", "OTEL_TRACES_SAMPLER": "TraceIdRatio",
                                    "OTEL_TRACES_SAMPLER_ARG": "0.25"})
    tracing = apply_env(mesh, env).observability.tracing
    assert (tracing.enabled, tracing.otlp_endpoint, tracing.sampler, tracing.sample_ratio) == (
        True, "https://otel.example.com:4317", "traceidratio", 0.25)
    assert env.otel_service_name == "auth"  # a process's span name, not a key of mesh.yaml
    # The sampler alone does not turn tracing on: the endpoint (or mesh.yaml) does.
    only = apply_env(mesh, EnvSettings.from_environ({"OTEL_TRACES_SAMPLER": "always_off"})).observability.tracing
    assert (only.enabled, only.sampler, only.sample_ratio) == (False, "always_off", 1.0)
    # JAEGER_HOST naming the same endpoint agrees; a different one is a located error.
    same = EnvSettings.from_environ({"JAEGER_HOST": "jaeger", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317"})
    assert apply_env(mesh, same).observability.tracing.otlp_endpoint == "http://jaeger:4317"
    with pytest.raises(ConfigError) as info:
        apply_env(mesh, EnvSettings.from_environ({"JAEGER_HOST": "jaeger",
                                                  "OTEL_EXPORTER_OTLP_ENDPOINT": "http://tempo:4317"}))
    assert str(info.value) == ("environment: OTEL_EXPORTER_OTLP_ENDPOINT: JAEGER_HOST is set too and means "
                               "http://jaeger:4317, not http://tempo:4317: unset one of them")


def test_the_samplers_of_the_model_are_the_env_checks() -> None:
    from typing import get_args

    from aivo_mesh.config.model import TRACES_SAMPLERS, TracingSpec

    assert set(get_args(TracingSpec.model_fields["sampler"].annotation)) == set(TRACES_SAMPLERS)


def test_docs_example_is_valid() -> None:
    doc = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    example = doc.split("## A short example", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    m = parse_mesh(example, "docs/config.md")
    assert service_policy(m, ANALYTICS).retry.max_retries == 2
    assert (service_policy(m, ANALYTICS).retry.backoff.base, service_policy(m, ANALYTICS).retry.backoff.max) == (
        0.1, 1.0)
    rp = route_policy(m, AUTH, VALIDATE_TOKEN)
    assert (rp.timeout, rp.retry.max_retries, rp.retry.retry_on) == (1.0, 3, ("UNAVAILABLE", "INTERNAL"))


# --------------------------------------------------------------------------- derived once per mesh


def _with_service(m: MeshSpec, name: str, **update: Any) -> MeshSpec:
    services = tuple(s.model_copy(update=update) if s.name == name else s for s in m.services)
    return m.model_copy(update={"services": services})


def test_what_is_derived_from_a_mesh_is_its_own(mesh: MeshSpec) -> None:
    from aivo_mesh.config.resolve import callable_peers, route_policies

    # Asked of one mesh first, so a result kept for it is there to be (wrongly) reused.
    assert service_policy(mesh, AUTH).timeout == 5.0
    assert callable_peers(mesh, LEARNER) == (AUTH, EVENTS)
    assert route_policies(mesh, AUTH)[0].timeout == 1.0
    assert mesh.service(AUTH).port == 50051
    # A copy with updates (as `meshctl apply` makes one): pydantic copies private attributes into it, so a
    # cache kept on the model would answer for the mesh it was copied from.
    auth = mesh.service(AUTH)
    routes = (auth.routes[0].model_copy(update={"timeout": 2.0}),)
    changed = _with_service(mesh, AUTH, timeout=7.0, port=50551, routes=routes, allow=auth.allow[:1])
    assert service_policy(changed, AUTH).timeout == 7.0
    assert route_policies(changed, AUTH)[0].timeout == 2.0
    assert changed.service(AUTH).port == 50551
    assert callable_peers(changed, LEARNER) == (EVENTS,)  # auth-svc no longer lets learner-svc call it
    # ...and the first mesh still has its own answers.
    assert service_policy(mesh, AUTH).timeout == 5.0
    assert callable_peers(mesh, LEARNER) == (AUTH, EVENTS)
    # A mesh read again from the same text is another object, with answers of its own (equal ones).
    again = parse_mesh(MESH_TEXT)
    assert service_policy(again, AUTH) == service_policy(mesh, AUTH)
    assert service_policy(again, AUTH) is not service_policy(mesh, AUTH)


def test_callable_peers_reads_names_spiffe_ids_and_the_wildcard(mesh: MeshSpec) -> None:
    from aivo_mesh.config.resolve import callable_peers

    analytics = mesh.service(ANALYTICS)
    data = copy.deepcopy(MESH_DATA)
    data["services"][3]["allow"] = [{"from": [mesh.spiffe_id(AUTH)]}, {"from": ["*"]}]
    data["services"][2]["allow"] = [{"from": [ANALYTICS, ANALYTICS, mesh.spiffe_id(ANALYTICS)]}]
    m = parse_mesh(yaml.safe_dump(data))
    assert analytics.name not in callable_peers(m, ANALYTICS)  # never itself, even through `*`
    assert callable_peers(m, AUTH) == (ANALYTICS,)  # its SPIFFE ID, once however many rules name it
    assert callable_peers(m, ANALYTICS) == (AUTH, LEARNER, EVENTS)  # mesh.yaml order
    assert callable_peers(m, "mesh-client") == (AUTH, LEARNER, ANALYTICS)  # any name, not only services


def test_derived_results_go_with_their_mesh() -> None:
    import gc

    from aivo_mesh.config.memo import cached_meshes

    before = cached_meshes()
    m = parse_mesh(MESH_TEXT)
    service_policy(m, AUTH)
    assert cached_meshes() == before + 1
    del m
    gc.collect()
    assert cached_meshes() == before


def test_a_failure_is_not_remembered_and_a_plan_is_handed_out_as_a_copy(mesh: MeshSpec) -> None:
    from aivo_mesh.config.ports import local_ports

    for _ in range(2):
        with pytest.raises(KeyError, match="unknown service 'nope-svc'"):
            service_policy(mesh, "nope-svc")
    ports = local_ports(mesh)
    ports.clear()
    assert local_ports(mesh)[AUTH].inbound == 50061


def test_an_error_raised_after_loading_names_the_line(tmp_path: Path) -> None:
    # The line index is worked out when an error first needs it (a large mesh has tens of thousands of paths).
    path = tmp_path / "mesh.yaml"
    path.write_text(MESH_TEXT)
    m = load_mesh(path)
    line = 1 + MESH_TEXT.splitlines().index("    local_port: 8082")
    assert str(m.error(("services", 1, "local_port"), "taken")) == f"{path}:{line}: services[1].local_port: taken"
    # The nearest written ancestor of a default value; a copy keeps its file's lines.
    sidecar = 1 + MESH_TEXT.splitlines().index("  - name: analytics-svc")
    copied = _with_service(m, ANALYTICS, timeout=1.0)
    assert str(copied.error(("services", 3, "fault"), "x")) == f"{path}:{sidecar}: services[3].fault: x"
    assert str(MeshSpec.model_validate(MESH_DATA).error(("services",), "x")) == "mesh.yaml: services: x"


def test_one_failure_threshold_for_the_breaker_and_the_ejection_on_both_planes(mesh: MeshSpec) -> None:
    """circuit_breaker.consecutive_failures: 2 on a service makes its proxyless breaker, its proxyless outlier
    detection and its Envoy peer clusters' ejection all act at 2 (mesh.yaml's defaults set both keys to 5:
    the service's level is the more specific); outlier_detection set at the same level keeps its own."""
    from aivo_mesh.render.envoy import EnvoyProfile, bootstrap

    def envoy_threshold(m: MeshSpec) -> tuple[int, int]:
        cfg = bootstrap(m, "learner-svc", EnvoyProfile.pod(m))
        od = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == "auth-svc")["outlier_detection"]
        return od["consecutive_5xx"], od["consecutive_gateway_failure"]

    def proxyless(m: MeshSpec) -> tuple[int, int]:
        sp = service_policy(m, "auth-svc")
        return (bind.breaker_params(sp.circuit_breaker).consecutive_failures,
                bind.outlier_rule(sp.outlier_detection).consecutive_failures)

    assert envoy_threshold(mesh) == (5, 5) and proxyless(mesh) == (5, 5)
    text = (ROOT / "mesh.yaml").read_text()
    auth = "    timeout: 5s\n    routes:\n      - match: /aivo.auth.v1.AuthService/ValidateToken"
    assert auth in text
    lowered = parse_mesh(text.replace(auth, "    timeout: 5s\n    circuit_breaker: {consecutive_failures: 2}\n"
                                            + auth.removeprefix("    timeout: 5s\n"), 1), "mesh.yaml")
    assert envoy_threshold(lowered) == (2, 2) and proxyless(lowered) == (2, 2)
    both = parse_mesh(text.replace(auth, "    timeout: 5s\n    circuit_breaker: {consecutive_failures: 2}\n"
                                         "    outlier_detection: {consecutive_failures: 7}\n"
                                         + auth.removeprefix("    timeout: 5s\n"), 1), "mesh.yaml")
    assert envoy_threshold(both) == (7, 7) and proxyless(both) == (2, 7)
    # Mesh-wide: a breaker threshold in `defaults` alone is the ejection's too.
    assert "    consecutive_failures: 5\n    # Ejected for" in text
    breaker_line = "consecutive_failures: 5       # failed calls"
    bare = parse_mesh(text.replace("    consecutive_failures: 5\n    # Ejected for", "    # Ejected for", 1)
                      .replace(breaker_line, breaker_line.replace("5", "3"), 1), "mesh.yaml")
    assert envoy_threshold(bare) == (3, 3) and proxyless(bare) == (3, 3)
