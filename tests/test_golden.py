"""telemetry/golden.py: quantiles, deltas, windows and the parsers, on captured real /metrics and Envoy
/stats?format=json (tests/fixtures/, taken from a `meshctl up` sidecar mesh after demo traffic and five
Authenticate calls refused with INVALID_ARGUMENT)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aivo_mesh.telemetry.golden import (
    INF,
    Calls,
    MeshSample,
    ProcessSample,
    SampleRing,
    delta,
    edges,
    envoy_histograms,
    envoy_rate_limited,
    envoy_values,
    golden,
    history,
    parse_metrics,
    parse_window,
    quantile,
    routes,
    service_golden,
    window_deltas,
)

FIXTURES = Path(__file__).parent / "fixtures"
AUTH = "/aivo.auth.v1.AuthService/Authenticate"
VALIDATE = "/aivo.auth.v1.AuthService/ValidateToken"

# 100 observations: 10 under 10 ms, 40 in (10, 20], 40 in (20, 50], 10 in (50, 100].
KNOWN = ((0.01, 10.0), (0.02, 50.0), (0.05, 90.0), (0.1, 100.0), (INF, 100.0))


def test_quantiles_interpolate_inside_the_bucket_holding_the_rank() -> None:
    assert quantile(0.5, KNOWN) == pytest.approx(0.02)  # rank 50: the top of (10, 20]
    assert quantile(0.95, KNOWN) == pytest.approx(0.075)  # rank 95: half way through (50, 100]
    assert quantile(0.99, KNOWN) == pytest.approx(0.095)  # rank 99: 9 of its 10
    assert quantile(0.05, KNOWN) == pytest.approx(0.005)  # the first bucket's lower bound is 0
    assert quantile(0.3, KNOWN) == pytest.approx(0.015)


def test_a_rank_in_the_inf_bucket_is_the_highest_finite_bound_and_no_calls_is_none() -> None:
    assert quantile(0.99, ((0.1, 50.0), (INF, 100.0))) == 0.1
    assert quantile(0.5, ((0.1, 0.0), (INF, 0.0))) is None
    assert quantile(0.5, ()) is None
    with pytest.raises(ValueError, match="quantile"):
        quantile(0.0, KNOWN)


def test_golden_of_known_calls_and_of_none() -> None:
    g = golden(Calls(100.0, 4.0, KNOWN), 50.0)
    assert g == {"requests": 100, "rps": 2.0, "success_rate": 0.96, "p50_ms": 20.0, "p95_ms": 75.0,
                 "p99_ms": 95.0}
    none = golden(Calls(0.0, 0.0, ((0.005, 0.0), (INF, 0.0))), 60.0)
    assert none == {"requests": 0, "rps": 0.0, "success_rate": None, "p50_ms": None, "p95_ms": None,
                    "p99_ms": None}


def test_delta_subtracts_counts_and_takes_a_restarted_series_as_new() -> None:
    first = Calls(10.0, 1.0, ((0.01, 5.0), (INF, 10.0)))
    last = Calls(30.0, 4.0, ((0.01, 15.0), (INF, 30.0)))
    assert delta(first, last) == Calls(20.0, 3.0, ((0.01, 10.0), (INF, 20.0)))
    restarted = Calls(3.0, 0.0, ((0.01, 3.0), (INF, 3.0)))
    assert delta(last, restarted) == restarted
    assert delta(None, last) == last  # a series born inside the window counted from 0


def _sample(at: float, **services: ProcessSample) -> MeshSample:
    return MeshSample(at=at, services=services)


def _proc(server: float, failed: float, client: float, rate_limited: float = 0.0) -> ProcessSample:
    fast = ((0.005, 1.0), (INF, 1.0))
    return ProcessSample(calls={
        ("server", "auth-svc", AUTH): Calls(server, failed, tuple((b, c * server) for b, c in fast)),
        ("client", "events-svc", "/x.Y/Z"): Calls(client, 0.0, tuple((b, c * client) for b, c in fast)),
    }, rate_limited=rate_limited)


def test_window_uses_the_first_and_last_sample_of_each_service_inside_it() -> None:
    samples = [_sample(0.0, **{"auth-svc": _proc(0, 0, 0)}),
               _sample(10.0, **{"auth-svc": _proc(100, 0, 10, 1)}),
               _sample(20.0, **{"auth-svc": _proc(300, 20, 30, 4)}),
               _sample(30.0)]  # unreachable in the last round
    d = window_deltas(samples, 5.0, 30.0)
    assert d.seconds == {"auth-svc": 10.0} and d.rate_limited == {"auth-svc": 3.0}
    server = service_golden(d, "auth-svc", "server")
    assert (server["requests"], server["rps"], server["success_rate"]) == (200, 20.0, 0.9)
    assert server["p99_ms"] == pytest.approx(4.95)
    assert service_golden(d, "auth-svc", "client")["requests"] == 20
    # A window holding one sample of a service has no rate: zero calls, nulls.
    one = window_deltas(samples, 15.0, 30.0)
    assert service_golden(one, "auth-svc", "server") == {"requests": 0, "rps": 0.0, "success_rate": None,
                                                          "p50_ms": None, "p95_ms": None, "p99_ms": None}


def test_a_service_first_read_inside_the_window_counts_from_zero() -> None:
    """Right after `meshctl up`: the first rounds could not read auth-svc (still starting); by its first read
    it had answered calls already. Those are in the window, not in a baseline."""
    samples = [_sample(0.0),  # auth-svc not readable yet
               _sample(2.0, **{"auth-svc": _proc(50, 5, 0)}),
               _sample(4.0, **{"auth-svc": _proc(50, 5, 0)})]
    server = service_golden(window_deltas(samples, 0.0, 4.0), "auth-svc", "server")
    assert (server["requests"], server["success_rate"]) == (50, 0.9)
    # Read from the observer's first round on: its counts then are the baseline, as for any window.
    seen = [_sample(0.0, **{"auth-svc": _proc(50, 5, 0)}), _sample(2.0, **{"auth-svc": _proc(50, 5, 0)})]
    assert service_golden(window_deltas(seen, 0.0, 2.0), "auth-svc", "server")["requests"] == 0


def test_routes_edges_and_history_from_captured_metrics() -> None:
    auth = parse_metrics((FIXTURES / "metrics_auth.txt").read_text())
    learner = parse_metrics((FIXTURES / "metrics_learner.txt").read_text())
    empty = ProcessSample()
    samples = [_sample(100.0, **{"auth-svc": empty, "learner-svc": empty}),
               _sample(110.0, **{"auth-svc": auth, "learner-svc": learner})]
    d = window_deltas(samples, 40.0, 110.0)
    rows = {(r["service"], r["route"], r["side"]): r["golden"] for r in routes(d)}
    assert rows[("auth-svc", AUTH, "server")]["success_rate"] == pytest.approx(273 / 278, abs=1e-4)
    assert rows[("auth-svc", VALIDATE, "server")]["success_rate"] == 1.0
    assert rows[("auth-svc", VALIDATE, "client")]["requests"] == 273  # learner-svc's count of its calls
    assert not any(route.startswith("/grpc.health.v1.") for _, route, _ in rows)
    found = edges(d, {"learner-svc": "spiffe://aivo.local/ns/default/sa/learner-svc"})
    assert [(e["from"], e["to"], e["caller_identity"]) for e in found] == [
        ("learner-svc", "auth-svc", "spiffe://aivo.local/ns/default/sa/learner-svc")]
    assert found[0]["golden"]["rps"] == 27.3
    points = history(samples, "auth-svc", 90.0, 110.0, 10.0, route=AUTH)
    assert [p["t"] for p in points] == [100.0, 110.0]
    assert points[0]["rps"] == 0.0 and points[0]["success_rate"] is None
    assert points[1]["rps"] == 27.8


def test_parse_metrics_reads_the_captured_exposition() -> None:
    auth = parse_metrics((FIXTURES / "metrics_auth.txt").read_text())
    calls = auth.calls[("server", "auth-svc", AUTH)]
    assert (calls.requests, calls.failures) == (278.0, 5.0)
    assert calls.buckets[0] == (0.005, 278.0) and calls.buckets[-1] == (INF, 278.0)
    assert auth.rate_limited == 0.0
    limited = parse_metrics('grpc_rate_limited_total{service="auth-svc",caller="spiffe://a/b",method="/a.B/C"} 7\n')
    assert limited.rate_limited == 7.0
    with pytest.raises(ValueError, match="Prometheus"):
        parse_metrics("grpc_requests_total{side=\"server\" 1\n")


def test_envoy_stats_json_parsers_on_a_captured_document() -> None:
    doc = json.loads((FIXTURES / "envoy_stats_auth.json").read_text())
    values = envoy_values(doc)
    assert values["cluster.local_app.grpc.aivo.auth.v1.AuthService.Authenticate.failure"] == 5
    assert envoy_rate_limited(values) == 0.0
    assert envoy_rate_limited({"inbound_rate_limit.http_local_rate_limit.rate_limited": 3.0,
                               "inbound_rate_limit_Login.http_local_rate_limit.rate_limited": 2.0,
                               "inbound_rate_limit.http_local_rate_limit.ok": 9.0}) == 5.0
    hists = envoy_histograms(doc)
    rq_time = hists["cluster.local_app.upstream_rq_time"]
    assert rq_time[-1][0] == INF and rq_time[-1][1] == rq_time[-2][1] > 0
    assert quantile(0.5, rq_time) is not None
    with pytest.raises(ValueError, match="format=json"):
        envoy_values({"cluster.x": 1})


def test_the_ring_keeps_fifteen_minutes_at_most() -> None:
    ring = SampleRing(span=900.0, interval=2.0)
    for i in range(2000):
        ring.add(MeshSample(at=i * 2.0, services={}))
    assert len(ring) <= 452
    kept = ring.samples()
    assert kept[-1].at - kept[0].at <= 902.0


@pytest.mark.parametrize(("text", "seconds"), [("60", 60.0), ("1m", 60.0), ("30s", 30.0), ("1.5m", 90.0),
                                               (120, 120.0), ("1h", 3600.0)])
def test_parse_window(text: str | float, seconds: float) -> None:
    assert parse_window(text) == seconds


@pytest.mark.parametrize("text", ["", "1d", "-1", "0", "m"])
def test_parse_window_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="window"):
        parse_window(text)
