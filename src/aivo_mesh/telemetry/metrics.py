"""Prometheus metrics of one mesh process: one `MeshMetrics` per process, on its own registry.

    metrics = MeshMetrics()
    client_listener = MetricsListener(metrics)        # a PolicyListener for MeshClient's stack
    server = MeshServer(..., observers=[ServerMetricsObserver(metrics)])
    metrics.set_certificate_expiry("auth-svc", identity)
    body = metrics.render()                           # text exposition 0.0.4, no `_created` series

A service that already serves prometheus_client's default registry (start_http_server, make_asgi_app,
a framework's /metrics) passes it instead, and gets these families there:

    client = MeshClient(config, metrics=prometheus_client.REGISTRY)
    server = MeshServer(mesh, "auth-svc", ..., metrics=prometheus_client.REGISTRY)

Families (names are the platform's documented ones; see docs/telemetry.md):

    grpc_requests_total{side,service,method,status}        counter
    grpc_request_duration_seconds{side,service,method}     histogram, OTel buckets .005 .. 10 s
    grpc_retries_total{service,method}                     counter (client)
    retry_budget_exhausted_total{service}                  counter (client)
    grpc_local_rejections_total{service,reason}            counter (client)
    circuit_breaker_state{service}                         gauge: 0 closed, 1 half_open, 2 open,
                                                           3 forced_open, 4 disabled
    circuit_breaker_failures_total{service}                counter
    outlier_ejections_total{service}                       counter
    outlier_ejected_endpoints{service}                     gauge
    mtls_certificate_expiry_seconds{service}               gauge, seconds left (negative once expired)
    mesh_peer_certificate_refusals_total{side,service,rule} counter: peer certificates the mesh's peer
                                                           policy refused (rule: pki.peer.Rule)
    mtls_refused_connections_total{service,reason}         counter: TLS connections refused by this server
                                                           (runtime.handshakes.REASONS)
    grpc_rate_limited_total{service,caller,method}         counter: calls this server's rate limit refused
                                                           (caller: the SPIFFE ID; mesh.yaml `rate_limit`)
    mesh_injected_faults_total{service,method,fault}       counter: faults injected by the server
                                                           (fault: delay, abort; policy.fault)

`side` is "client" (service = the target) or "server" (service = this process's own service).
`status` is the gRPC status NAME; a reply made locally by a policy layer gets its own value
(`CIRCUIT_OPEN`, `LOCAL_OVERFLOW`, `LOCAL_DEADLINE_EXCEEDED`, ...) so it never looks like a
server error. Labels come from the proto path only, never from peer addresses; a method that is not
a well-formed `/pkg.Service/Method` path is counted as `method="unknown"` to bound cardinality.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from aivo_mesh.buckets import DURATION_BUCKETS
from aivo_mesh.pki.peer import Rule
from aivo_mesh.policy.breaker import STATE_GAUGE
from aivo_mesh.policy.core import LocalReason, monotonic
from aivo_mesh.policy.events import PolicyListener, ServerCall
from aivo_mesh.runtime.handshakes import REASONS as TLS_REFUSAL_REASONS

__all__ = [
    "BREAKER_STATES",
    "DURATION_BUCKETS",
    "LIMIT_REASONS",
    "MeshMetrics",
    "MetricsListener",
    "ServerMetricsObserver",
    "local_status",
    "method_label",
]

# Breaker state names -> circuit_breaker_state values: the breaker's own table, all five states (a
# state missing here left the gauge at its old value). Not an Enum metric: that would add a label per
# state and change the family's label set.
BREAKER_STATES: dict[str, int] = STATE_GAUGE

# Reasons of grpc_local_rejections_total for limit_rejected(limit=...); anything else is "other".
LIMIT_REASONS = frozenset({str(LocalReason.MAX_REQUESTS), str(LocalReason.MAX_PENDING_REQUESTS), "max_connections",
                           "max_retries"})

# The status label of a call the concurrency limit refused (UNAVAILABLE, as Envoy's overflow): not
# LOCAL_UNAVAILABLE, so it never looks like a call with no endpoint to go to.
OVERFLOW = "LOCAL_OVERFLOW"
# The status label of a call the breaker refused: not LOCAL_UNAVAILABLE, so it never looks like a
# connection failure.
CIRCUIT_OPEN = "CIRCUIT_OPEN"

SIDES = ("client", "server")
_RULES = frozenset(str(r) for r in Rule)  # a bounded label set, whatever a caller passes

_METHOD_RE = re.compile(r"^/[A-Za-z_][A-Za-z0-9_.]*/[A-Za-z_][A-Za-z0-9_]*$")
_STATUS_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_SERVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CALLER_RE = re.compile(r"^spiffe://[A-Za-z0-9._~%!$&'()*+,;=:@/-]{1,256}$")


def method_label(method: str | bytes) -> str:
    """The method label: the full gRPC path `/pkg.Service/Method`, or "unknown" for anything else."""
    m = method.decode("utf-8", "replace") if isinstance(method, bytes) else method
    if m and not m.startswith("/"):
        m = "/" + m
    return m if _METHOD_RE.match(m) else "unknown"


def service_label(service: str) -> str:
    return service if _SERVICE_RE.match(service) else "unknown"


def status_label(code: str) -> str:
    return code if _STATUS_RE.match(code) else "UNKNOWN"


def local_status(code: str, local: LocalReason | None) -> str:
    """The status label of a finished call: its code name; for a call the client answered itself,
    `CIRCUIT_OPEN` when the breaker refused it, `LOCAL_OVERFLOW` when the concurrency limit's queue was
    full, else `LOCAL_<code>` (`LOCAL_DEADLINE_EXCEEDED` for a client-side deadline, `LOCAL_UNAVAILABLE`
    for no endpoints), so it never looks like a server's answer."""
    code = status_label(code)
    if local is None:
        return code
    if local is LocalReason.CIRCUIT_OPEN:
        return CIRCUIT_OPEN
    if local is LocalReason.MAX_PENDING_REQUESTS:
        return OVERFLOW
    return code if code.startswith("LOCAL_") else f"LOCAL_{code}"


class _Expiring(Protocol):
    def seconds_left(self) -> float: ...


class MeshMetrics:
    """Every metric family of one process. Pass a registry to share one; by default a fresh
    `CollectorRegistry` (never the global one, so two instances in one test process never clash)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "grpc_requests", "gRPC calls finished, by side (client/server), service, method and final status name. "
            "Calls answered locally by a policy layer have their own status (CIRCUIT_OPEN, LOCAL_*).",
            ["side", "service", "method", "status"], registry=r)
        self.duration = Histogram(
            "grpc_request_duration_seconds", "Duration of gRPC calls in seconds, all attempts included "
            "(client) or in the handler (server).",
            ["side", "service", "method"], buckets=DURATION_BUCKETS, registry=r)
        self.retries = Counter(
            "grpc_retries", "Retry attempts sent by the client policy stack, by target service and method.",
            ["service", "method"], registry=r)
        self.budget_exhausted = Counter(
            "retry_budget_exhausted", "Retries not sent because the target's retry budget was exhausted.",
            ["service"], registry=r)
        self.local_rejections = Counter(
            "grpc_local_rejections", "Calls or retries refused locally, before reaching the network, by reason "
            "(circuit_open, max_requests, max_pending_requests, retry_budget, ...).",
            ["service", "reason"], registry=r)
        self.breaker_state = Gauge(
            "circuit_breaker_state",
            "Circuit breaker state per target service: 0=closed, 1=half_open, 2=open, 3=forced_open, 4=disabled.",
            ["service"], registry=r)
        self.breaker_failures = Counter(
            "circuit_breaker_failures", "Failures counted by the circuit breaker of a target service.",
            ["service"], registry=r)
        self.ejections = Counter(
            "outlier_ejections", "Endpoints ejected by outlier detection, per target service.",
            ["service"], registry=r)
        self.ejected = Gauge(
            "outlier_ejected_endpoints", "Endpoints currently ejected by outlier detection, per target service.",
            ["service"], registry=r)
        self.cert_expiry = Gauge(
            "mtls_certificate_expiry_seconds", "Seconds until the certificate's notAfter; negative once expired.",
            ["service"], registry=r)
        self.peer_refusals = Counter(
            "mesh_peer_certificate_refusals", "Peer certificates refused by the mesh's peer policy, by side "
            "(server: a caller's certificate, per call; client: a server's, per connection), service and "
            "rule (leaf_is_ca, weak_key, weak_signature, revoked, ...).",
            ["side", "service", "rule"], registry=r)
        self.tls_refusals = Counter(
            "mtls_refused_connections", "TLS connections this server refused, by reason (no_client_certificate, "
            "unknown_ca, certificate_expired, certificate_verify_failed, tls_version, not_tls, "
            "closed_during_handshake, handshake_error).",
            ["service", "reason"], registry=r)
        self.rate_limited = Counter(
            "grpc_rate_limited", "Calls this server refused with RESOURCE_EXHAUSTED because the caller's rate-limit "
            "bucket was empty, by service, caller (SPIFFE ID) and method.",
            ["service", "caller", "method"], registry=r)
        self.faults = Counter(
            "mesh_injected_faults", "Faults mesh.yaml's `fault` injected into calls this server admitted, by "
            "service, method and fault (delay, abort).",
            ["service", "method", "fault"], registry=r)
        self._ejected: dict[str, set[str]] = {}

    @classmethod
    def exposed_in(cls, registry: CollectorRegistry | None = None) -> MeshMetrics:
        """The MeshMetrics this process exposes in `registry` (default: prometheus_client.REGISTRY, the
        one start_http_server, make_wsgi_app/make_asgi_app and most frameworks serve).

        Created on first use and registered there as one collector (its families without `_created`);
        every later call with the same registry returns the same instance, so a MeshClient and a
        MeshServer given `metrics=registry` share it and no family is registered twice. It keeps its own
        registry as well, so an AdminServer given it serves the same families on /metrics."""
        target = REGISTRY if registry is None else registry
        with _EXPOSED_LOCK:
            metrics = _EXPOSED.get(target)
            if metrics is None:
                metrics = cls()
                target.register(metrics)  # a Collector: it has collect()
                _EXPOSED[target] = metrics
            return metrics

    @classmethod
    def resolve(cls, metrics: MeshMetrics | CollectorRegistry | None) -> MeshMetrics | None:
        """What the `metrics=` option of MeshClient and MeshServer names: a MeshMetrics as it is, a
        registry as `exposed_in(registry)`, None as None."""
        if metrics is None or isinstance(metrics, MeshMetrics):
            return metrics
        if isinstance(metrics, CollectorRegistry):
            return cls.exposed_in(metrics)
        raise TypeError(f"metrics: expected a MeshMetrics or a prometheus_client CollectorRegistry, "
                        f"got {type(metrics).__name__}")

    # -- recording -------------------------------------------------------------------------------

    def declare_target(self, service: str) -> None:
        """Publish a target's breaker (closed) and ejection gauges before its first event."""
        s = service_label(service)
        self.breaker_state.labels(s).set(0)
        self.ejected.labels(s).set(len(self._ejected.get(s, ())))

    def observe_call(self, side: str, service: str, method: str, status: str, seconds: float) -> None:
        """One finished call. `status` is already the label value (see `local_status`)."""
        if side not in SIDES:
            raise ValueError(f"side must be 'client' or 'server', not {side!r}")
        s, m = service_label(service), method_label(method)
        self.requests.labels(side, s, m, status_label(status)).inc()
        self.duration.labels(side, s, m).observe(max(0.0, seconds))

    def observe_retry(self, service: str, method: str) -> None:
        self.retries.labels(service_label(service), method_label(method)).inc()

    def observe_budget_exhausted(self, service: str) -> None:
        s = service_label(service)
        self.budget_exhausted.labels(s).inc()
        self.local_rejections.labels(s, "retry_budget").inc()

    def observe_local_rejection(self, service: str, reason: str) -> None:
        self.local_rejections.labels(service_label(service), reason).inc()

    def observe_rate_limited(self, service: str, caller: str | None, method: str) -> None:
        """A call refused by the server's rate limit. `caller`: a SPIFFE ID (callers passed mTLS and the
        allow-list, so the set is the mesh's identities), "unknown" without one."""
        who = caller if caller is not None and _CALLER_RE.match(caller) else "unknown"
        self.rate_limited.labels(service_label(service), who, method_label(method)).inc()

    def set_breaker_state(self, service: str, state: str) -> None:
        value = BREAKER_STATES.get(state.lower().replace("-", "_"))
        if value is not None:
            self.breaker_state.labels(service_label(service)).set(value)

    def observe_breaker_failure(self, service: str) -> None:
        self.breaker_failures.labels(service_label(service)).inc()

    def endpoint_ejected(self, service: str, endpoint: str) -> None:
        s = service_label(service)
        self.ejections.labels(s).inc()
        ejected = self._ejected.setdefault(s, set())
        ejected.add(endpoint)  # the endpoint only sizes the gauge; it is never a label
        self.ejected.labels(s).set(len(ejected))

    def endpoint_restored(self, service: str, endpoint: str) -> None:
        s = service_label(service)
        ejected = self._ejected.setdefault(s, set())
        ejected.discard(endpoint)
        self.ejected.labels(s).set(len(ejected))

    def observe_peer_refusal(self, side: str, service: str, rule: str) -> None:
        if side not in SIDES:
            raise ValueError(f"side must be 'client' or 'server', not {side!r}")
        self.peer_refusals.labels(side, service_label(service), rule if rule in _RULES else "other").inc()

    def observe_fault(self, service: str, method: str, *, delay: bool, abort: bool) -> None:
        """One injected fault: a call delayed, aborted or both (each counted under its own `fault`)."""
        for kind, injected in (("delay", delay), ("abort", abort)):
            if injected:
                self.faults.labels(service_label(service), method_label(method), kind).inc()

    def set_certificate_expiry(self, service: str, identity: _Expiring | float) -> None:
        """Export the seconds left on `service`'s certificate. Given an object with `seconds_left()`
        (a `pki.Identity`) the value is computed at every scrape; call again after a rotation."""
        child = self.cert_expiry.labels(service_label(service))
        if isinstance(identity, int | float):
            seconds = float(identity)
            child.set_function(lambda: seconds)  # replaces any earlier function (a plain set() would not)
        else:
            child.set_function(identity.seconds_left)

    def declare_tls_refusals(self, service: str) -> None:
        """Publish every refusal reason of `service` at 0, so rates exist before the first refusal."""
        s = service_label(service)
        for reason in TLS_REFUSAL_REASONS:
            self.tls_refusals.labels(s, reason)

    def observe_tls_refusal(self, service: str, reason: str) -> None:
        self.tls_refusals.labels(service_label(service),
                                 reason if reason in TLS_REFUSAL_REASONS else "handshake_error").inc()

    # -- reading ---------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """The registry's families without the `_created` samples prometheus_client adds."""
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family

    def render(self) -> bytes:
        """Prometheus text exposition format 0.0.4."""
        return generate_latest(self)

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        """Flat (name, labels, value): counters, gauges, and each histogram's `_count` and `_sum`."""
        out: list[tuple[str, dict[str, str], float]] = []
        for family in self.collect():
            for s in family.samples:
                if family.type == "histogram" and s.name.endswith("_bucket"):
                    continue
                out.append((s.name, dict(s.labels), float(s.value)))
        return out


# Registry -> the MeshMetrics exposed in it (MeshMetrics.exposed_in). Weak: a test's throwaway registry
# takes its MeshMetrics with it.
_EXPOSED: weakref.WeakKeyDictionary[CollectorRegistry, MeshMetrics] = weakref.WeakKeyDictionary()
_EXPOSED_LOCK = threading.Lock()


class MetricsListener(PolicyListener):
    """Feeds MeshMetrics from the client policy stack (side="client", service = the target)."""

    def __init__(self, metrics: MeshMetrics) -> None:
        self.metrics = metrics

    def call_finished(self, service: str, method: str, code: str, seconds: float, attempts: int,
                      local: LocalReason | None) -> None:
        self.metrics.observe_call("client", service, method, local_status(code, local), seconds)

    def retry(self, service: str, method: str, attempt: int, code: str, delay: float) -> None:
        self.metrics.observe_retry(service, method)

    def retry_budget_exhausted(self, service: str, method: str) -> None:
        self.metrics.observe_budget_exhausted(service)

    def breaker_state(self, service: str, old: str, new: str) -> None:
        self.metrics.set_breaker_state(service, new)

    def breaker_failure(self, service: str, code: str) -> None:
        self.metrics.observe_breaker_failure(service)

    def breaker_rejected(self, service: str, method: str) -> None:
        self.metrics.observe_local_rejection(service, LocalReason.CIRCUIT_OPEN)

    def limit_rejected(self, service: str, method: str, limit: str) -> None:
        self.metrics.observe_local_rejection(service, limit if limit in LIMIT_REASONS else "other")

    def endpoint_ejected(self, service: str, endpoint: str, seconds: float) -> None:
        self.metrics.endpoint_ejected(service, endpoint)

    def endpoint_restored(self, service: str, endpoint: str) -> None:
        self.metrics.endpoint_restored(service, endpoint)

    def peer_refused(self, service: str, endpoint: str, rule: str) -> None:
        self.metrics.observe_peer_refusal("client", service, rule)


class ServerMetricsObserver:
    """A ServerCallObserver: side="server", service = this server's own service."""

    def __init__(self, metrics: MeshMetrics) -> None:
        self.metrics = metrics

    def start(self, call: ServerCall) -> object:
        return None

    def finish(self, token: object, call: ServerCall, code: str, error: BaseException | None) -> None:
        self.metrics.observe_call("server", call.service, call.method, code, monotonic() - call.started)
        if call.rate_limited:
            self.metrics.observe_rate_limited(call.service, call.caller, call.method)
        if call.refusal is not None:
            self.metrics.observe_peer_refusal("server", call.service, call.refusal)
