"""Prometheus metrics: family names, label sets and HELP text, the policy listener, the server observer
(also behind a real grpc.aio server), and `promtool check metrics` on the rendered exposition."""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import dataclass

import grpc
import pytest
from binaries import needs, require
from prometheus_client.parser import text_string_to_metric_families
from waiting import until

from aivo_mesh.policy.core import LocalReason, monotonic
from aivo_mesh.policy.events import ServerCall
from aivo_mesh.server.interceptors import GuardedServer, MeshServerInterceptor
from aivo_mesh.services.protos import auth_pb2, auth_pb2_grpc
from aivo_mesh.telemetry.metrics import (
    DURATION_BUCKETS,
    MeshMetrics,
    MetricsListener,
    ServerMetricsObserver,
    local_status,
    method_label,
)

LOGIN = "/aivo.auth.v1.AuthService/Authenticate"
VALIDATE = "/aivo.auth.v1.AuthService/ValidateToken"

EXPECTED = {
    # family name as exposed: (type, label names)
    "grpc_requests": ("counter", {"side", "service", "method", "status"}),
    "grpc_request_duration_seconds": ("histogram", {"side", "service", "method"}),
    "grpc_retries": ("counter", {"service", "method"}),
    "retry_budget_exhausted": ("counter", {"service"}),
    "grpc_local_rejections": ("counter", {"service", "reason"}),
    "circuit_breaker_state": ("gauge", {"service"}),
    "circuit_breaker_failures": ("counter", {"service"}),
    "outlier_ejections": ("counter", {"service"}),
    "outlier_ejected_endpoints": ("gauge", {"service"}),
    "mtls_certificate_expiry_seconds": ("gauge", {"service"}),
    "mesh_peer_certificate_refusals": ("counter", {"side", "service", "rule"}),
    "mtls_refused_connections": ("counter", {"service", "reason"}),
    "grpc_rate_limited": ("counter", {"service", "caller", "method"}),
    "mesh_injected_faults": ("counter", {"service", "method", "fault"}),
}


@dataclass
class FakeIdentity:
    left: float

    def seconds_left(self) -> float:
        return self.left


def value(metrics: MeshMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def exercise_every_family(metrics: MeshMetrics) -> None:
    listener = MetricsListener(metrics)
    listener.call_started("auth-svc", LOGIN)
    listener.call_finished("auth-svc", LOGIN, "OK", 0.012, 1, None)
    listener.call_finished("auth-svc", LOGIN, "UNAVAILABLE", 0.3, 3, None)
    listener.retry("auth-svc", LOGIN, 2, "UNAVAILABLE", 0.05)
    listener.retry_budget_exhausted("auth-svc", LOGIN)
    listener.breaker_failure("auth-svc", "UNAVAILABLE")
    listener.breaker_state("auth-svc", "closed", "open")
    listener.breaker_rejected("auth-svc", LOGIN)
    listener.call_finished("auth-svc", LOGIN, "UNAVAILABLE", 0.0001, 1, LocalReason.CIRCUIT_OPEN)
    listener.limit_rejected("auth-svc", VALIDATE, "max_requests")
    listener.endpoint_ejected("auth-svc", "10.1.2.3:50061", 30.0)
    metrics.set_certificate_expiry("learner-svc", FakeIdentity(86_400.5))
    metrics.observe_tls_refusal("learner-svc", "unknown_ca")
    metrics.observe_fault("auth-svc", LOGIN, delay=True, abort=True)
    ServerMetricsObserver(metrics).finish(None, ServerCall("learner-svc", VALIDATE, "spiffe://x/api", (),
                                                           monotonic() - 0.02), "OK", None)
    ServerMetricsObserver(metrics).finish(None, ServerCall("learner-svc", VALIDATE, None, (), monotonic(),
                                                           refusal="weak_key"), "UNAUTHENTICATED", None)
    listener.peer_refused("auth-svc", "10.1.2.3:50061", "revoked")
    listener.peer_refused("auth-svc", "10.1.2.3:50061", "made-up rule")  # bounded: counted as "other"
    ServerMetricsObserver(metrics).finish(None, ServerCall("learner-svc", VALIDATE, "spiffe://x/api", (), monotonic(),
                                                           rate_limited=True), "RESOURCE_EXHAUSTED", None)


def test_families_names_types_labels_and_help() -> None:
    metrics = MeshMetrics()
    exercise_every_family(metrics)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert set(families) == set(EXPECTED)
    for name, (kind, labels) in EXPECTED.items():
        fam = families[name]
        assert fam.type == kind, name
        assert fam.documentation, f"{name} has no HELP"
        sample_labels = {k for s in fam.samples for k in s.labels if k != "le"}
        assert sample_labels == labels, name
    assert "0=closed, 1=half_open, 2=open" in families["circuit_breaker_state"].documentation
    help_cert = families["mtls_certificate_expiry_seconds"].documentation
    assert "notAfter" in help_cert
    assert "negative once expired" in help_cert


def test_exposition_uses_documented_names_and_buckets() -> None:
    metrics = MeshMetrics()
    exercise_every_family(metrics)
    text = metrics.render().decode()
    for line in ("# TYPE grpc_requests_total counter", "# TYPE grpc_request_duration_seconds histogram",
                 "# TYPE circuit_breaker_state gauge", "# TYPE circuit_breaker_failures_total counter",
                 "# TYPE mtls_certificate_expiry_seconds gauge", "# TYPE grpc_retries_total counter",
                 "# TYPE retry_budget_exhausted_total counter", "# TYPE grpc_local_rejections_total counter",
                 "# TYPE outlier_ejections_total counter", "# TYPE outlier_ejected_endpoints gauge"):
        assert line in text
    assert "_created" not in text
    assert DURATION_BUCKETS[0] == 0.005
    assert DURATION_BUCKETS[-1] == 10.0
    assert 'le="0.005"' in text
    assert 'le="10.0"' in text
    assert 'le="+Inf"' in text
    # labels come from the proto path only: the ejected endpoint's address is nowhere
    assert "10.1.2.3" not in text


def test_client_calls_status_names_and_local_rejections() -> None:
    metrics = MeshMetrics()
    exercise_every_family(metrics)
    base = {"side": "client", "service": "auth-svc", "method": LOGIN}
    assert value(metrics, "grpc_requests_total", **base, status="OK") == 1
    assert value(metrics, "grpc_requests_total", **base, status="UNAVAILABLE") == 1
    # the breaker's local UNAVAILABLE is not a server error
    assert value(metrics, "grpc_requests_total", **base, status="CIRCUIT_OPEN") == 1
    assert value(metrics, "grpc_request_duration_seconds_count", **base) == 3
    assert value(metrics, "grpc_retries_total", service="auth-svc", method=LOGIN) == 1
    assert value(metrics, "retry_budget_exhausted_total", service="auth-svc") == 1
    for reason in ("retry_budget", "circuit_open", "max_requests"):
        assert value(metrics, "grpc_local_rejections_total", service="auth-svc", reason=reason) == 1
    assert value(metrics, "circuit_breaker_state", service="auth-svc") == 2
    assert value(metrics, "circuit_breaker_failures_total", service="auth-svc") == 1


def test_local_status_values() -> None:
    assert local_status("UNAVAILABLE", None) == "UNAVAILABLE"
    assert local_status("UNAVAILABLE", LocalReason.CIRCUIT_OPEN) == "CIRCUIT_OPEN"
    assert local_status("UNAVAILABLE", LocalReason.NO_ENDPOINTS) == "LOCAL_UNAVAILABLE"
    assert local_status("UNAVAILABLE", LocalReason.MAX_PENDING_REQUESTS) == "LOCAL_OVERFLOW"
    assert local_status("DEADLINE_EXCEEDED", LocalReason.DEADLINE) == "LOCAL_DEADLINE_EXCEEDED"
    assert local_status("not a code", None) == "UNKNOWN"
    metrics = MeshMetrics()
    listener = MetricsListener(metrics)
    listener.call_started("a", LOGIN)
    listener.limit_rejected("a", LOGIN, "max_pending_requests")
    listener.call_finished("a", LOGIN, "UNAVAILABLE", 0.0, 1, LocalReason.MAX_PENDING_REQUESTS)
    assert value(metrics, "grpc_requests_total", side="client", service="a", method=LOGIN,
                 status="LOCAL_OVERFLOW") == 1
    assert value(metrics, "grpc_local_rejections_total", service="a", reason="max_pending_requests") == 1
    listener.call_started("a", LOGIN)
    listener.call_finished("a", LOGIN, "DEADLINE_EXCEEDED", 0.0, 1, LocalReason.DEADLINE)
    assert value(metrics, "grpc_requests_total", side="client", service="a", method=LOGIN,
                 status="LOCAL_DEADLINE_EXCEEDED") == 1
    # a call that waited for a slot and ran out of time is counted by the limit, labelled by its reply
    listener.call_started("a", LOGIN)
    listener.limit_rejected("a", LOGIN, "max_requests")
    listener.call_finished("a", LOGIN, "DEADLINE_EXCEEDED", 0.0, 1, LocalReason.MAX_REQUESTS)
    assert value(metrics, "grpc_requests_total", side="client", service="a", method=LOGIN,
                 status="LOCAL_DEADLINE_EXCEEDED") == 2
    assert value(metrics, "grpc_local_rejections_total", service="a", reason="max_requests") == 1
    listener.limit_rejected("a", LOGIN, "something else")
    assert value(metrics, "grpc_local_rejections_total", service="a", reason="other") == 1


async def test_concurrent_local_replies_are_labelled_by_their_own_reason() -> None:
    metrics = MeshMetrics()
    listener = MetricsListener(metrics)

    async def rejected() -> None:
        listener.call_started("a", LOGIN)
        listener.breaker_rejected("a", LOGIN)
        await asyncio.sleep(0)
        listener.call_finished("a", LOGIN, "UNAVAILABLE", 0.0, 1, LocalReason.CIRCUIT_OPEN)

    async def timed_out() -> None:
        listener.call_started("a", LOGIN)
        await asyncio.sleep(0)
        listener.call_finished("a", LOGIN, "DEADLINE_EXCEEDED", 0.0, 1, LocalReason.DEADLINE)

    await asyncio.gather(rejected(), timed_out())
    labels = {"side": "client", "service": "a", "method": LOGIN}
    assert value(metrics, "grpc_requests_total", **labels, status="CIRCUIT_OPEN") == 1
    assert value(metrics, "grpc_requests_total", **labels, status="LOCAL_DEADLINE_EXCEEDED") == 1


def test_breaker_gauge_values_and_ejections() -> None:
    metrics = MeshMetrics()
    listener = MetricsListener(metrics)
    metrics.declare_target("learner-svc")
    assert value(metrics, "circuit_breaker_state", service="learner-svc") == 0
    assert value(metrics, "outlier_ejected_endpoints", service="learner-svc") == 0
    for new, expected in (("open", 2), ("half_open", 1), ("closed", 0), ("OPEN", 2), ("bogus", 2),
                          ("forced_open", 3), ("disabled", 4), ("closed", 0)):
        listener.breaker_state("learner-svc", "x", new)
        assert value(metrics, "circuit_breaker_state", service="learner-svc") == expected
    listener.endpoint_ejected("learner-svc", "10.0.0.1:1", 30.0)
    listener.endpoint_ejected("learner-svc", "10.0.0.1:1", 60.0)  # re-ejected: counted, not doubled
    listener.endpoint_ejected("learner-svc", "10.0.0.2:1", 30.0)
    assert value(metrics, "outlier_ejections_total", service="learner-svc") == 3
    assert value(metrics, "outlier_ejected_endpoints", service="learner-svc") == 2
    listener.endpoint_restored("learner-svc", "10.0.0.1:1")
    listener.endpoint_restored("learner-svc", "10.0.0.9:1")  # unknown: harmless
    assert value(metrics, "outlier_ejected_endpoints", service="learner-svc") == 1


def test_breaker_gauge_follows_a_forced_open_breaker() -> None:
    """An operator's force_open rejects every call: the gauge must say so (it kept its old value)."""
    from aivo_mesh.policy.breaker import BreakerParams, CircuitBreaker

    metrics = MeshMetrics()
    breaker = CircuitBreaker("auth-svc", BreakerParams(), listener=MetricsListener(metrics))
    breaker.force_open()
    assert value(metrics, "circuit_breaker_state", service="auth-svc") == 3
    breaker.disable()
    assert value(metrics, "circuit_breaker_state", service="auth-svc") == 4


async def test_breaker_gauge_follows_the_breaker_a_policy_change_puts_in_place() -> None:
    """A changed circuit_breaker replaces an open breaker with a closed one: the gauge says closed, and
    the old breaker (still used by calls in flight) can no longer move it."""
    from random import Random

    from aivo_mesh.config.model import MeshSpec
    from aivo_mesh.config.resolve import route_policies, service_policy
    from aivo_mesh.policy.core import Call, Reply
    from aivo_mesh.policy.stack import TargetPolicy
    from aivo_mesh.policy.testing import FakeClock

    def mesh(failures: int) -> MeshSpec:
        return MeshSpec.model_validate({"services": [{
            "name": "auth-svc", "grpc_service": "aivo.auth.v1.AuthService", "port": 50051, "local_port": 50061,
            "circuit_breaker": {"consecutive_failures": failures}}]})

    async def data_loss(call: Call) -> Reply:
        return Reply("DATA_LOSS")

    clock, metrics = FakeClock(), MeshMetrics()
    t = TargetPolicy.from_mesh(mesh(1), "auth-svc", data_loss, clock=clock, rng=Random(0),
                               listener=MetricsListener(metrics), inherited=lambda: None)
    old_stack = t.stack_for(LOGIN)
    await old_stack(Call("auth-svc", LOGIN, None))
    assert value(metrics, "circuit_breaker_state", service="auth-svc") == 2
    # The outlier detection follows the breaker's threshold (config.resolve): both change.
    assert t.update(service_policy(mesh(3), "auth-svc"), route_policies(mesh(3), "auth-svc")) == {"breaker", "outlier"}
    assert value(metrics, "circuit_breaker_state", service="auth-svc") == 0
    clock.advance(120.0)
    await old_stack(Call("auth-svc", LOGIN, None))  # the old breaker's probe fails: it reopens, silently
    assert value(metrics, "circuit_breaker_state", service="auth-svc") == 0
    assert value(metrics, "circuit_breaker_failures_total", service="auth-svc") == 1


def test_certificate_expiry_is_computed_at_scrape_time() -> None:
    metrics = MeshMetrics()
    ident = FakeIdentity(100.0)
    metrics.set_certificate_expiry("auth-svc", ident)
    assert value(metrics, "mtls_certificate_expiry_seconds", service="auth-svc") == 100.0
    ident.left = -5.0  # expired: negative, as HELP says
    assert value(metrics, "mtls_certificate_expiry_seconds", service="auth-svc") == -5.0
    metrics.set_certificate_expiry("auth-svc", 42)  # a plain number works too
    assert value(metrics, "mtls_certificate_expiry_seconds", service="auth-svc") == 42.0


def test_labels_are_bounded() -> None:
    assert method_label(LOGIN) == LOGIN
    assert method_label(b"/aivo.auth.v1.AuthService/Authenticate") == LOGIN
    assert method_label("aivo.auth.v1.AuthService/Authenticate") == LOGIN
    for bad in ("", "/", "10.0.0.1:443", "/a/b/c", "/pkg.Svc/Method?x=1", "/pkg.Svc/Me thod"):
        assert method_label(bad) == "unknown", bad
    metrics = MeshMetrics()
    metrics.observe_call("client", "10.0.0.1:443", "http://10.0.0.1/x", "OK", 0.1)
    text = metrics.render().decode()
    assert "10.0.0.1" not in text
    assert 'service="unknown"' in text
    assert 'method="unknown"' in text
    with pytest.raises(ValueError, match="side"):
        metrics.observe_call("proxy", "a", LOGIN, "OK", 0.1)


def test_own_registry_per_instance() -> None:
    a, b = MeshMetrics(), MeshMetrics()
    a.observe_call("server", "auth-svc", LOGIN, "OK", 0.1)
    assert value(a, "grpc_requests_total", side="server", service="auth-svc", method=LOGIN, status="OK") == 1
    assert value(b, "grpc_requests_total", side="server", service="auth-svc", method=LOGIN, status="OK") is None


def test_listener_behind_fan_out() -> None:
    # policy.events.Listeners calls each listener in turn: every one must see the rejection
    metrics = MeshMetrics()
    fan = [MetricsListener(MeshMetrics()), MetricsListener(metrics)]
    for listener in fan:
        listener.call_started("a", LOGIN)
    for listener in fan:
        listener.breaker_rejected("a", LOGIN)
    for listener in fan:
        listener.call_finished("a", LOGIN, "UNAVAILABLE", 0.001, 1, LocalReason.CIRCUIT_OPEN)
    assert value(metrics, "grpc_requests_total", side="client", service="a", method=LOGIN,
                 status="CIRCUIT_OPEN") == 1


def test_samples_flatten_counters_gauges_and_histogram_totals() -> None:
    metrics = MeshMetrics()
    exercise_every_family(metrics)
    names = {name for name, _, _ in metrics.samples()}
    assert "grpc_requests_total" in names
    assert "circuit_breaker_state" in names
    assert "grpc_request_duration_seconds_count" in names
    assert "grpc_request_duration_seconds_sum" in names
    assert not any(n.endswith("_bucket") or n.endswith("_created") for n in names)


class Auth(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self) -> None:
        self.slow_calls = 0

    async def ValidateToken(self, request: auth_pb2.ValidateTokenRequest,
                            context: grpc.aio.ServicerContext) -> auth_pb2.ValidateTokenResponse:
        if request.token == "slow":
            self.slow_calls += 1
            await asyncio.sleep(5)  # cut by the caller's deadline, or by the caller cancelling
        if request.token != "good":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")
        return auth_pb2.ValidateTokenResponse(valid=True, subject="Ada")


@pytest.mark.parametrize("attach", ["registered", "interceptor"])
async def test_server_observer_behind_a_real_grpc_server(attach: str) -> None:
    """The guard in front of handlers as MeshServer attaches it (at registration: GuardedServer), and as
    the first interceptor (what MeshServer does when given interceptors of the caller's own)."""
    metrics = MeshMetrics()
    guard = MeshServerInterceptor(None, service="auth-svc", require_tls=False,
                                  observers=[ServerMetricsObserver(metrics)])
    server = GuardedServer(guard, options=()) if attach == "registered" else grpc.aio.server(interceptors=[guard])
    auth = Auth()
    auth_pb2_grpc.add_AuthServiceServicer_to_server(auth, server)
    if isinstance(server, GuardedServer):
        server.guard_unknown_methods()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            assert (await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="good"))).valid
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="bad"))
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="slow"), timeout=0.2)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            call = stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="slow"), timeout=30)
            await until(lambda: auth.slow_calls == 2, 5, "the second slow call reached the handler")
            call.cancel()
            base = {"side": "server", "service": "auth-svc", "method": VALIDATE}
            # The server saw both as its handler being cancelled; the deadline is told apart.
            await until(lambda: value(metrics, "grpc_request_duration_seconds_count", **base) == 4, 5,
                        "both cut calls recorded")
            # A method the server does not have: UNIMPLEMENTED as grpc answers, and seen under one label.
            for path in ("/aivo.auth.v1.AuthService/Nope", "/scan/../etc/passwd"):
                with pytest.raises(grpc.aio.AioRpcError) as missing:
                    await channel.unary_unary(path)(b"", timeout=5)
                assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)
    assert value(metrics, "grpc_requests_total", **base, status="OK") == 1
    assert value(metrics, "grpc_requests_total", **base, status="UNAUTHENTICATED") == 1
    assert value(metrics, "grpc_requests_total", **base, status="DEADLINE_EXCEEDED") == 1
    assert value(metrics, "grpc_requests_total", **base, status="CANCELLED") == 1
    assert value(metrics, "grpc_request_duration_seconds_count", **base) == 4
    assert value(metrics, "grpc_requests_total", side="server", service="auth-svc", method="unknown",
                 status="UNIMPLEMENTED") == 2
    assert "Nope" not in metrics.render().decode() and "passwd" not in metrics.render().decode()
    assert "127.0.0.1" not in metrics.render().decode()


@needs("promtool")
def test_promtool_check_metrics_accepts_every_family() -> None:
    metrics = MeshMetrics()
    exercise_every_family(metrics)
    metrics.declare_target("learner-svc")
    body = metrics.render()
    for name in EXPECTED:
        assert f"# TYPE {name}".encode() in body
    done = subprocess.run([require("promtool"), "check", "metrics"], input=body, capture_output=True, timeout=30,
                          check=False)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    assert not done.stdout.strip(), "promtool lint warnings"
    assert not done.stderr.strip(), "promtool lint warnings"


@needs("promtool")
def test_promtool_really_checks() -> None:
    bad = b"# HELP x_total A counter.\n# TYPE x_total counter\nx_total{a=\"1\" 1\n"
    done = subprocess.run([require("promtool"), "check", "metrics"], input=bad, capture_output=True, timeout=30,
                          check=False)
    assert done.returncode != 0


async def test_a_failing_server_observer_never_fails_the_call(caplog: pytest.LogCaptureFixture) -> None:
    """Telemetry is best effort on the server side too: an observer that raises is logged, the call
    and the other observers go on."""
    class Broken:
        def start(self, call: ServerCall) -> object:
            raise RuntimeError("observer bug")

        def finish(self, token: object, call: ServerCall, code: str, error: BaseException | None) -> None:
            raise RuntimeError("observer bug")

    metrics = MeshMetrics()
    guard = MeshServerInterceptor(None, service="auth-svc", require_tls=False,
                                  observers=[Broken(), ServerMetricsObserver(metrics)])
    server = grpc.aio.server(interceptors=[guard])
    auth_pb2_grpc.add_AuthServiceServicer_to_server(Auth(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            assert (await stub.ValidateToken(auth_pb2.ValidateTokenRequest(token="good"), timeout=5)).valid
    finally:
        await server.stop(None)
    assert value(metrics, "grpc_requests_total", side="server", service="auth-svc", method=VALIDATE,
                 status="OK") == 1
    assert len([r for r in caplog.records if "server observer" in r.getMessage()]) == 2


# -- metrics=<registry>: the registry a Python service already exposes -------------------------------

class _Auth(auth_pb2_grpc.AuthServiceServicer):
    async def ValidateToken(self, request: auth_pb2.ValidateTokenRequest,
                            context: grpc.aio.ServicerContext) -> auth_pb2.ValidateTokenResponse:
        return auth_pb2.ValidateTokenResponse(valid=True, subject="s")


async def test_one_option_puts_the_client_and_server_metrics_in_a_prometheus_registry(mesh, mesh_certs) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from aivo_mesh.client import MeshClient, MeshConfig
    from aivo_mesh.server import MeshServer

    registry = CollectorRegistry()  # stands for prometheus_client.REGISTRY (next test), without global state
    server = MeshServer.for_service(mesh, "auth-svc", mesh_certs, port=0, metrics=registry)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(_Auth(), server.grpc_server)
    await server.start()
    try:
        config = MeshConfig.for_identity("mesh-client", mesh_certs, mesh,
                                         endpoints={"auth-svc": [f"127.0.0.1:{server.bound_port}"]})
        async with MeshClient(config, health_checks=False, metrics=registry) as client:
            reply = await client.call_with_retry("auth-svc", "ValidateToken", auth_pb2.ValidateTokenRequest(token="t"),
                                                 timeout=5)
            assert reply.valid
    finally:
        await server.stop(0)
    # Both share the one MeshMetrics exposed in that registry: no family registered twice.
    assert client.metrics is server.metrics is MeshMetrics.exposed_in(registry)
    ok = {"service": "auth-svc", "method": VALIDATE, "status": "OK"}
    assert registry.get_sample_value("grpc_requests_total", {"side": "client", **ok}) == 1
    assert registry.get_sample_value("grpc_requests_total", {"side": "server", **ok}) == 1
    assert registry.get_sample_value("circuit_breaker_state", {"service": "auth-svc"}) == 0
    assert (registry.get_sample_value("mtls_certificate_expiry_seconds", {"service": "auth-svc"}) or 0) > 86_400
    text = generate_latest(registry).decode()
    assert "_created" not in text
    assert {f.name for f in text_string_to_metric_families(text)} == set(EXPECTED)


async def test_metrics_option_with_prometheus_clients_default_registry(mesh, mesh_certs) -> None:
    import prometheus_client

    from aivo_mesh.client import MeshClient, MeshConfig
    from aivo_mesh.telemetry import metrics as metrics_module

    config = MeshConfig.for_identity("mesh-client", mesh_certs, mesh)
    client = MeshClient(config, health_checks=False, metrics=prometheus_client.REGISTRY)
    try:
        client.target("auth-svc")
        # What start_http_server / make_asgi_app serve.
        assert "# TYPE grpc_requests_total counter" in prometheus_client.generate_latest().decode()
        assert prometheus_client.REGISTRY.get_sample_value("circuit_breaker_state", {"service": "auth-svc"}) == 0
        assert MeshMetrics.exposed_in() is client.metrics  # the default is that registry
    finally:
        await client.close()
        assert client.metrics is not None
        prometheus_client.REGISTRY.unregister(client.metrics)  # leave the process-wide registry as found
        metrics_module._EXPOSED.pop(prometheus_client.REGISTRY, None)


def test_a_second_meshmetrics_in_one_registry_would_clash_so_exposed_in_shares_one() -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    MeshMetrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        MeshMetrics(registry)
    other = CollectorRegistry()
    assert MeshMetrics.exposed_in(other) is MeshMetrics.exposed_in(other)
    assert MeshMetrics.resolve(None) is None
    m = MeshMetrics()
    assert MeshMetrics.resolve(m) is m
    with pytest.raises(TypeError, match="CollectorRegistry"):
        MeshMetrics.resolve("prometheus")  # type: ignore[arg-type]
